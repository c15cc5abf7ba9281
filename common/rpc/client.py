"""Client side of the two services: channels, credentials, uploads and errors, for every caller.

The `sharedllm compress`/`generate`/`health` commands, the benchmark's gRPC cell and the batch
worker all dial the services the same way; what a call needs besides its request lives here once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.errors import SharedLLMError
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2, decoder_pb2
from sharedllm.common.rpc.tls import ClientTls

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


GROUNDING_FIELDS = {
    "quote": decoder_pb2.GROUNDING_QUOTE,
    "facts": decoder_pb2.GROUNDING_FACTS,
    "off": decoder_pb2.GROUNDING_OFF,
}


def grounding_field(params: SamplingParams) -> int:
    """GenerateRequest.grounding for the parameters: always explicit, so a server's default never
    changes what a client asked for."""
    return GROUNDING_FIELDS[params.grounding]


def call_metadata(api_key: str | None) -> list[tuple[str, str]]:
    """The metadata that authenticates a call (none without a key)."""
    return [("authorization", f"Bearer {api_key}")] if api_key else []


# Replicas: calls spread round-robin over the addresses a target resolves to, and a call refused
# with UNAVAILABLE (a replica stopping, restarting or still loading its model) is retried on
# another, with backoff, before any response arrived. Streams too large to buffer are not retried.
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "sharedllm.v1.CompressorService"}, {"service": "sharedllm.v1.DecoderService"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def channel_target(target: str) -> str:
    """HOST:PORT, several IPv4 HOST:PORT joined by commas (replicas), or any gRPC target URI
    (e.g. dns:///decoder.sharedllm.svc:50052, which resolves to every replica of a headless Service)."""
    if "," in target and ":" in target and "://" not in target and not target.startswith(("ipv4:", "ipv6:")):
        return "ipv4:" + target
    return target


def channel_credentials(tls: ClientTls) -> grpc.ChannelCredentials:
    """TLS credentials from the client's PEM files, read now (a bad file is a ConfigError here,
    not a failed handshake later)."""
    private_key, certificate_chain = tls.key_pair()
    return grpc.ssl_channel_credentials(tls.root_certificates(), private_key, certificate_chain)


def open_channel(target: str, tls: ClientTls | None = None) -> grpc.Channel:
    """A channel to a service: one address or several replicas (channel_target), in plaintext
    (tls None, the services' default) or over TLS, verifying the server and, with a client
    certificate, proving who the client is (mutual TLS)."""
    options: list[tuple[str, str | int]] = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]
    if tls is None:
        return grpc.insecure_channel(channel_target(target), options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(channel_target(target), channel_credentials(tls), options=options)


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
