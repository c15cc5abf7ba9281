"""Client side of the two services: channels, credentials, uploads and errors, for every caller.

The `sharedllm compress`/`generate` commands, the benchmark's gRPC cell and the batch worker all
dial the services the same way; what a call needs besides its request lives here once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from sharedllm.common.errors import SharedLLMError
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2

PIECE_BYTES = 1 << 20  # CompressStream piece size: well under any sensible message limit


class RemoteError(SharedLLMError):
    """A call ended with a non-OK status; printed as `CODE: details`."""


@contextmanager
def remote_errors() -> Iterator[None]:
    """Turn a failed call into a RemoteError naming its status code and details."""
    try:
        yield
    except grpc.RpcError as exc:
        raise RemoteError(f"{exc.code().name}: {exc.details()}") from None


def call_metadata(api_key: str | None) -> list[tuple[str, str]]:
    """The metadata that authenticates a call (none without a key)."""
    return [("authorization", f"Bearer {api_key}")] if api_key else []


def open_channel(target: str) -> grpc.Channel:
    """A channel to HOST:PORT of a service."""
    return grpc.insecure_channel(target)


def upload(
    options: compressor_pb2.CompressOptions, document: BinaryIO
) -> Iterator[compressor_pb2.CompressStreamRequest]:
    """A CompressStream request stream: the options, then the document in PIECE_BYTES pieces."""
    yield compressor_pb2.CompressStreamRequest(options=options)
    for piece in iter(lambda: document.read(PIECE_BYTES), b""):
        yield compressor_pb2.CompressStreamRequest(text=piece)


def as_dict(message: Message) -> dict:
    """A response as JSON-ready data, with protobuf field names and every field present."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
