"""`sharedllm serve compressor|decoder`, and the clients `sharedllm compress` and `sharedllm generate`.

    sharedllm serve compressor --store-url redis://localhost:6379/0          # port 50051
    sharedllm serve decoder --store-url redis://localhost:6379/0             # port 50052
    ID=$(sharedllm compress --target localhost:50051 book.txt)
    sharedllm generate --target localhost:50052 --context "$ID" "Who is Naomi?"

The clients read the API key from SHAREDLLM_API_KEY (or --api-key). `compress` always uploads
through CompressStream, so documents of any size within the server's limits go through.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import grpc
import torch
from google.protobuf import json_format
from google.protobuf.message import Message

from common.cli.embedded import add_evidence_arguments, add_sampling_arguments, format_evidence, sampling_params
from common.engine.evidence import Passage
from common.errors import SharedLLMError
from common.generated.sharedllm.v1 import compressor_pb2, compressor_pb2_grpc, decoder_pb2, decoder_pb2_grpc
from common.rpc.config import MIB, ServerConfig, add_server_arguments
from common.rpc.server import serve
from compressor_service.server import SPEC as COMPRESSOR
from decoder_service.server import SPEC as DECODER
from decoder_service.servicer import SAMPLING_FIELDS

PIECE_BYTES = MIB  # CompressStream piece size: well under any sensible message limit


class RemoteError(SharedLLMError):
    """A call ended with a non-OK status; printed as `CODE: details`."""


def add_rpc_commands(sub: argparse._SubParsersAction) -> None:
    serve_parser = sub.add_parser("serve", help="run a gRPC service (flags also read SHAREDLLM_<FLAG> variables)")
    services = serve_parser.add_subparsers(dest="service", required=True)
    for spec in (COMPRESSOR, DECODER):
        p = services.add_parser(spec.name, help=f"serve {spec.full_name} (default port {spec.default_port})")
        add_server_arguments(p, spec.default_port)
        p.set_defaults(handler=run_serve, spec=spec)

    compress = sub.add_parser("compress", help="compress a document on a compressor service; prints the id")
    compress.add_argument("document", type=Path, help="UTF-8 text file")
    compress.add_argument("--context-id", help="store under this id (default: the server picks one)")
    lifetime = compress.add_mutually_exclusive_group()
    lifetime.add_argument("--ttl-s", type=float, help="lifetime after each use (default: the server's)")
    lifetime.add_argument("--pin", action="store_true", help="never expire")
    add_client_arguments(compress)
    compress.set_defaults(handler=run_compress)

    generate = sub.add_parser("generate", help="ask a decoder service about a compressed context; streams")
    generate.add_argument("prompt")
    generate.add_argument("--context", required=True, help="context id printed by `sharedllm compress`")
    add_sampling_arguments(generate)
    add_evidence_arguments(generate)
    generate.add_argument("--evidence", action="store_true", help="print the excerpts the answer read, under it")
    add_client_arguments(generate)
    generate.set_defaults(handler=run_generate)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="HOST:PORT of the service")
    parser.add_argument(
        "--api-key", default=os.environ.get("SHAREDLLM_API_KEY"), help="API key (default: $SHAREDLLM_API_KEY)"
    )
    parser.add_argument("--timeout-s", type=float, help="deadline of the call (default: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_serve(args: argparse.Namespace) -> int:
    config = ServerConfig.from_args(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    return asyncio.run(serve(args.spec, config))


@contextmanager
def remote_errors() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        raise RemoteError(f"{exc.code().name}: {exc.details()}") from None


def call_options(args: argparse.Namespace) -> dict:
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    return {"metadata": metadata, "timeout": args.timeout_s}


def as_dict(message: Message) -> dict:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def upload(
    options: compressor_pb2.CompressOptions, document: BinaryIO
) -> Iterator[compressor_pb2.CompressStreamRequest]:
    yield compressor_pb2.CompressStreamRequest(options=options)
    for piece in iter(lambda: document.read(PIECE_BYTES), b""):
        yield compressor_pb2.CompressStreamRequest(text=piece)


def run_compress(args: argparse.Namespace) -> int:
    options = compressor_pb2.CompressOptions(pin=args.pin)
    if args.context_id is not None:
        options.context_id = args.context_id
    if args.ttl_s is not None:
        options.ttl_seconds = args.ttl_s
    with args.document.open("rb") as document, grpc.insecure_channel(args.target) as channel, remote_errors():
        stub = compressor_pb2_grpc.CompressorServiceStub(channel)
        context = stub.CompressStream(upload(options, document), **call_options(args)).context
    print(json.dumps(as_dict(context), indent=2) if args.json else context.context_id)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    sampling = {name: getattr(params, name) for name in SAMPLING_FIELDS if getattr(params, name) is not None}
    request = decoder_pb2.GenerateRequest(
        context_id=args.context,
        prompt=args.prompt,
        stop=params.stop,
        disable_retrieval=args.no_retrieval,
        **sampling,
    )
    if args.evidence_tokens is not None:
        request.evidence_tokens = args.evidence_tokens
    if args.evidence_mode is not None:
        request.evidence_mode = args.evidence_mode
    started = time.perf_counter()
    first_token_s: float | None = None
    text: list[str] = []
    token_ids: list[int] = []
    last = decoder_pb2.GenerateResponse()
    with grpc.insecure_channel(args.target) as channel, remote_errors():
        for response in decoder_pb2_grpc.DecoderServiceStub(channel).Generate(request, **call_options(args)):
            if response.token_ids and first_token_s is None:
                first_token_s = time.perf_counter() - started
            text.append(response.text)
            token_ids += response.token_ids
            if not args.json:
                print(response.text, end="", flush=True)
            if response.finish_reason:
                last = response
    reason = decoder_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    if args.json:
        report = {
            "answer": "".join(text),
            "token_ids": token_ids,
            "finish_reason": reason,
            "usage": as_dict(last.usage),
            "timings": as_dict(last.timings),
            "evidence": [as_dict(p) for p in last.evidence],
            "client_time_to_first_token_s": first_token_s,
        }
        print(json.dumps(report, indent=2))
    else:
        print()
        if args.evidence:
            passages = (
                Passage(p.token_start, p.token_end, p.char_start, p.char_end, p.text, p.score) for p in last.evidence
            )
            print("\n" + format_evidence(tuple(passages)))
        ttft = last.timings.time_to_first_token_seconds
        print(
            f"[finish: {reason} | {last.usage.completion_tokens} tokens | first token {ttft:.3f} s (server) | "
            f"context {last.usage.context_tokens} tokens, {last.usage.context_bytes_read / 1e6:.2f} MB read, "
            f"evidence {last.usage.evidence_tokens} tokens, "
            f"{last.usage.context_nodes_cached} nodes cached]",
            file=sys.stderr,
        )
    return 0
