"""`sharedllm ask`: the whole pipeline in one process, no Redis."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sharedllm.cli.evidence import format_citations, format_evidence
from sharedllm.cli.observability import client_trace
from sharedllm.cli.options import EvidenceArguments, ModelArguments, SamplingArguments
from sharedllm.common.data.documents import read_text
from sharedllm.common.engine.results import TokenDelta, run_to_end
from sharedllm.common.errors import InvalidInput

MAX_DOCUMENT_BYTES = 64 << 20
MODEL = ModelArguments()
SAMPLING = SamplingArguments()
EVIDENCE = EvidenceArguments()


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("document", type=Path)
    parser.add_argument("question")
    MODEL.add_arguments(parser.add_argument_group("model"))
    SAMPLING.add_arguments(parser.add_argument_group("sampling"))
    EVIDENCE.add_arguments(parser.add_argument_group("evidence"))
    parser.add_argument("--evidence", action="store_true", help="print the excerpts the answer read, under it")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument(
        "--trace", action="store_true", help="print this run's spans and their durations on stderr, as a tree"
    )
    parser.set_defaults(handler=run_ask)


def read_document(path: Path) -> str:
    """Read a UTF-8 text file; binary or oversized files are refused with the reason."""
    try:
        return read_text(path, MAX_DOCUMENT_BYTES)
    except InvalidInput as exc:
        raise InvalidInput(f"{path} {exc}") from None


def run_ask(args: argparse.Namespace) -> int:
    with client_trace(args.command, tree=args.trace):
        return _ask(args)


def _ask(args: argparse.Namespace) -> int:
    # The model's libraries load here, not with the module: `ask --help` must not wait for torch.
    from tqdm import tqdm

    from sharedllm.common.engine.engine import Engine
    from sharedllm.common.runtime import ContextRuntime
    from sharedllm.common.store import open_store

    text = read_document(args.document)
    question = args.question
    evidence = EVIDENCE.from_args(args)
    params = SAMPLING.from_args(args)
    engine = Engine.from_choice(MODEL.from_args(args))
    params.validate(engine.window)
    engine.prompt_ids(question)
    if not engine.trained:
        print(
            "sharedllm: warning: the adapter is untrained, so the answer ignores the document "
            "(train one with `sharedllm train`)",
            file=sys.stderr,
        )
    ids = engine.tokenize_document(text)
    # One question per run: a decoded cache would only hold a second copy of what it reads.
    runtime = ContextRuntime(
        engine, open_store("memory://"), default_ttl_s=None, decoded_cache_bytes=0, evidence=evidence
    )
    chunks = -(-len(ids) // engine.adapter.config.chunk_size)
    with tqdm(total=chunks, desc="compress", unit="chunk", disable=args.json or None, file=sys.stderr) as bar:
        compressed = runtime.compress_ids(ids, progress=lambda done, total: bar.update(done - bar.n))

    def streamed():
        for event in runtime.generate(compressed.context_id, question, params, retrieval=not args.no_retrieval):
            if isinstance(event, TokenDelta) and not args.json:
                print(event.text, end="", flush=True)
            yield event

    finished = run_to_end(streamed())
    tokens_per_s = finished.tokens_per_s
    report = {
        "answer": finished.text,
        "finish_reason": finished.reason,
        "document_tokens": compressed.n_tokens,
        "chunks": compressed.chunks,
        "stored_bytes": compressed.stored_bytes,
        "bytes_per_token": round(compressed.bytes_per_token, 1),
        "kv_cache_ratio": round(compressed.kv_cache_ratio, 4),
        "compression_ratio": round(compressed.compression_ratio, 2),
        "bytes_read": finished.context.bytes_read if finished.context else 0,
        "compression_s": round(compressed.timings.compress_s, 3),
        "time_to_first_token_s": round(finished.timings.time_to_first_token_s, 3),
        "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 2),
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "adapter_trained": engine.trained,
        "evidence_tokens": finished.evidence_tokens,
        "evidence": [p.to_dict() for p in finished.evidence],
        "citations": [c.to_dict() for c in finished.citations],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print()
    # A quoted answer is copied from the document, not decoded: it has no decode speed.
    speed = f"{tokens_per_s:.2f} tokens/s" if tokens_per_s is not None else "no decoding"
    if args.evidence:
        print("\n" + format_citations(finished.text, finished.citations))
        print("\n" + format_evidence(finished.evidence))
    print(
        f"\n[document {report['document_tokens']} tokens in {report['chunks']} chunks | "
        f"compression {report['compression_s']} s | stored {report['stored_bytes'] / 1e6:.1f} MB | "
        f"ratio {report['compression_ratio']}x | evidence {report['evidence_tokens']} tokens | "
        f"first token {report['time_to_first_token_s']} s | "
        f"{speed} | finish: {report['finish_reason']}]",
        file=sys.stderr,
    )
    return 0
