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
from sharedllm.common.engine.results import CompressOutcome, Finished, TokenDelta
from sharedllm.common.errors import InvalidInput
from sharedllm.common.rpc.client import CompressorClient, DecoderClient

CLIENT = ClientArguments()
SAMPLING = SamplingArguments()
EVIDENCE = EvidenceArguments()


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    if name == "compress":
        parser.add_argument("document", type=Path, help="UTF-8 text file")
        parser.add_argument("--context-id", help="store under this id (default: the server picks one)")
        parser.add_argument(
            "--append",
            metavar="ID",
            help="add the file's text to the end of stored context ID instead (its last chunk and the new text "
            "are encoded; the rest is kept as stored)",
        )
        lifetime = parser.add_mutually_exclusive_group()
        lifetime.add_argument("--ttl-s", type=float, help="lifetime after each use (default: the server's)")
        lifetime.add_argument("--pin", action="store_true", help="never expire")
        parser.set_defaults(handler=run_compress)
    else:
        parser.add_argument("prompt")
        parser.add_argument(
            "--context",
            required=True,
            action="append",
            metavar="ID",
            help="context id printed by `sharedllm compress`; repeat it to ask across several documents",
        )
        SAMPLING.add_arguments(parser.add_argument_group("sampling"))
        EVIDENCE.add_arguments(parser.add_argument_group("evidence"))
        parser.add_argument("--evidence", action="store_true", help="print the excerpts the answer read, under it")
        parser.set_defaults(handler=run_generate)
    CLIENT.add_arguments(parser.add_argument_group("service"))


def client_options(args: argparse.Namespace) -> dict:
    return {"api_key": args.api_key, "tls": CLIENT.tls.from_args(args), "timeout_s": args.timeout_s}


def compressed_report(outcome: CompressOutcome) -> dict:
    """`compress --json`: the CompressedContext message's field names, as the API documents them."""
    t = outcome.timings
    return {
        "context_id": outcome.context_id,
        "document_tokens": outcome.n_tokens,
        "chunks": outcome.chunks,
        "stored_bytes": outcome.stored_bytes,
        "compression_ratio": outcome.compression_ratio,
        "bytes_per_token": outcome.bytes_per_token,
        "kv_cache_ratio": outcome.kv_cache_ratio,
        "timings": {
            "tokenize_seconds": t.tokenize_s,
            "compress_seconds": t.compress_s,
            "store_seconds": t.store_s,
            "total_seconds": t.total_s,
        },
        "reused": outcome.reused,
    }


def run_compress(args: argparse.Namespace) -> int:
    if args.append is not None and (args.context_id is not None or args.ttl_s is not None or args.pin):
        raise InvalidInput("--append keeps the context's id and lifetime: drop --context-id, --ttl-s and --pin")
    with (
        client_trace("compress"),
        args.document.open("rb") as document,
        CompressorClient(args.target, **client_options(args)) as client,
    ):
        if args.append is not None:
            appended = client.append(args.append, document)
            report = {
                **compressed_report(appended.context),
                "encoded_tokens": appended.encoded_tokens,
                "kept_chunks": appended.kept_chunks,
                "encoded_chunks": appended.encoded_chunks,
                "bytes_written": appended.bytes_written,
            }
            print(json.dumps(report, indent=2) if args.json else appended.context.context_id)
            return 0
        outcome = client.compress(document, context_id=args.context_id, ttl_s=args.ttl_s, pin=args.pin)
    print(json.dumps(compressed_report(outcome), indent=2) if args.json else outcome.context_id)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    params = SAMPLING.from_args(args)
    options = {
        "retrieval": not args.no_retrieval,
        "evidence_tokens": args.evidence_tokens,
        "evidence_mode": args.evidence_mode,
    }
    started = time.perf_counter()
    first_token_s: float | None = None
    token_ids: list[int] = []
    last: Finished | None = None
    with client_trace("generate"), DecoderClient(args.target, **client_options(args)) as client:
        for event in client.generate(args.context, args.prompt, params, **options):  # one id, or several
            if isinstance(event, Finished):
                last = event
            elif event.token_id is not None:
                first_token_s = first_token_s or time.perf_counter() - started
                token_ids.append(event.token_id)
            if isinstance(event, TokenDelta) and not args.json:
                print(event.text, end="", flush=True)
    assert last is not None  # the client raises when the stream ends without its last message
    if args.json:
        report = {
            "answer": last.text,
            "token_ids": token_ids,
            "finish_reason": last.reason,
            "usage": {
                "prompt_tokens": last.prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "context_tokens": last.context.tokens,
                "context_chunks": last.context.chunks,
                "context_bytes_read": last.context.bytes_read,
                "context_nodes_cached": last.context.cached_nodes,
                "evidence_tokens": last.evidence_tokens,
            },
            "timings": {
                "context_load_seconds": last.timings.context_read_s,
                "selection_seconds": last.timings.selection_s,
                "prefill_seconds": last.timings.prefill_s,
                "time_to_first_token_seconds": last.timings.time_to_first_token_s,
                "decode_seconds": last.timings.decode_s,
                "evidence_seconds": last.timings.evidence_s,
            },
            "evidence": [p.to_dict() for p in last.evidence],
            "citations": [c.to_dict() for c in last.citations],
            "client_time_to_first_token_s": first_token_s,
        }
        print(json.dumps(report, indent=2))
        return 0
    print()
    if args.evidence:
        print("\n" + format_citations(last.text, last.citations))
        print("\n" + format_evidence(last.evidence))
    read = last.context
    print(
        f"[finish: {last.reason} | {last.completion_tokens} tokens | "
        f"first token {last.timings.time_to_first_token_s:.3f} s (server) | "
        f"context {read.tokens} tokens, {read.bytes_read / 1e6:.2f} MB read, "
        f"evidence {last.evidence_tokens} tokens, {read.cached_nodes} nodes cached]",
        file=sys.stderr,
    )
    return 0
