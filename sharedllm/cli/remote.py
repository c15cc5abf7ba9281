"""`sharedllm compress` and `sharedllm generate`: the clients of the two services.

    ID=$(sharedllm compress --target localhost:50051 book.txt)
    sharedllm generate --target localhost:50052 --context "$ID" "Who is Naomi?"

The clients read the API key from SHAREDLLM_API_KEY (or --api-key), and their TLS files from
SHAREDLLM_TLS_CA/_CERT/_KEY (or --tls-ca/--tls-cert/--tls-key). `compress` always uploads
through CompressStream, so documents of any size within the server's limits go through. Neither
loads torch: they build requests, stream responses and print.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sharedllm.cli.evidence import format_citations, format_evidence
from sharedllm.cli.observability import client_trace
from sharedllm.cli.options import ClientArguments, EvidenceArguments, SamplingArguments
from sharedllm.common.engine.params import SAMPLING_FIELDS
from sharedllm.common.engine.results import Citation, Passage
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2, compressor_pb2_grpc, decoder_pb2, decoder_pb2_grpc
from sharedllm.common.rpc.client import as_dict, call_metadata, grounding_field, open_channel, remote_errors, upload

CLIENT = ClientArguments()
SAMPLING = SamplingArguments()
EVIDENCE = EvidenceArguments()


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    if name == "compress":
        parser.add_argument("document", type=Path, help="UTF-8 text file")
        parser.add_argument("--context-id", help="store under this id (default: the server picks one)")
        lifetime = parser.add_mutually_exclusive_group()
        lifetime.add_argument("--ttl-s", type=float, help="lifetime after each use (default: the server's)")
        lifetime.add_argument("--pin", action="store_true", help="never expire")
        parser.set_defaults(handler=run_compress)
    else:
        parser.add_argument("prompt")
        parser.add_argument("--context", required=True, help="context id printed by `sharedllm compress`")
        SAMPLING.add_arguments(parser.add_argument_group("sampling"))
        EVIDENCE.add_arguments(parser.add_argument_group("evidence"))
        parser.add_argument("--evidence", action="store_true", help="print the excerpts the answer read, under it")
        parser.set_defaults(handler=run_generate)
    CLIENT.add_arguments(parser.add_argument_group("service"))


def call_options(args: argparse.Namespace) -> dict:
    return {"metadata": call_metadata(args.api_key), "timeout": args.timeout_s}


def run_compress(args: argparse.Namespace) -> int:
    options = compressor_pb2.CompressOptions(pin=args.pin)
    if args.context_id is not None:
        options.context_id = args.context_id
    if args.ttl_s is not None:
        options.ttl_seconds = args.ttl_s
    with (
        client_trace("compress"),
        args.document.open("rb") as document,
        open_channel(args.target, CLIENT.tls.from_args(args)) as channel,
        remote_errors(),
    ):
        stub = compressor_pb2_grpc.CompressorServiceStub(channel)
        context = stub.CompressStream(upload(options, document), **call_options(args)).context
    print(json.dumps(as_dict(context), indent=2) if args.json else context.context_id)
    return 0


def generate_request(args: argparse.Namespace) -> decoder_pb2.GenerateRequest:
    params = SAMPLING.from_args(args)
    sampling = {name: getattr(params, name) for name in SAMPLING_FIELDS if getattr(params, name) is not None}
    request = decoder_pb2.GenerateRequest(
        context_id=args.context,
        prompt=args.prompt,
        stop=params.stop,
        disable_retrieval=args.no_retrieval,
        grounding=grounding_field(params),
        **sampling,
    )
    if args.evidence_tokens is not None:
        request.evidence_tokens = args.evidence_tokens
    if args.evidence_mode is not None:
        request.evidence_mode = args.evidence_mode
    return request


def run_generate(args: argparse.Namespace) -> int:
    request = generate_request(args)
    started = time.perf_counter()
    first_token_s: float | None = None
    text: list[str] = []
    token_ids: list[int] = []
    last = decoder_pb2.GenerateResponse()
    tls = CLIENT.tls.from_args(args)
    with client_trace("generate"), open_channel(args.target, tls) as channel, remote_errors():
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
            "citations": [as_dict(c) for c in last.citations],
            "client_time_to_first_token_s": first_token_s,
        }
        print(json.dumps(report, indent=2))
        return 0
    print()
    if args.evidence:
        passages = [
            Passage(p.token_start, p.token_end, p.char_start, p.char_end, p.text, p.score) for p in last.evidence
        ]
        citations = [
            Citation(
                c.answer_start,
                c.answer_end,
                c.char_start,
                c.char_end,
                c.text,
                c.evidence_index if c.HasField("evidence_index") else None,
            )
            for c in last.citations
        ]
        print("\n" + format_citations("".join(text), citations))
        print("\n" + format_evidence(passages))
    ttft = last.timings.time_to_first_token_seconds
    print(
        f"[finish: {reason} | {last.usage.completion_tokens} tokens | first token {ttft:.3f} s (server) | "
        f"context {last.usage.context_tokens} tokens, {last.usage.context_bytes_read / 1e6:.2f} MB read, "
        f"evidence {last.usage.evidence_tokens} tokens, "
        f"{last.usage.context_nodes_cached} nodes cached]",
        file=sys.stderr,
    )
    return 0
