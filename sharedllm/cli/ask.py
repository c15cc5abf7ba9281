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
    parser = sub.add_parser(
        name,
        help=help_text,
        usage="%(prog)s DOC QUESTION [options] | %(prog)s DOC [DOC ...] -q QUESTION [options]",
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="DOC", help="the document and the question; with -q, every one is a document"
    )
    parser.add_argument("-q", "--question", help="the question, asked across every document given (in the order given)")
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


def documents_and_question(args: argparse.Namespace) -> tuple[list[Path], str]:
    """`ask DOC QUESTION`, or `ask DOC [DOC ...] -q QUESTION`."""
    if args.question is not None:
        return [Path(p) for p in args.inputs], args.question
    if len(args.inputs) != 2:
        raise InvalidInput(
            f"give one document and a question, or documents and -q QUESTION (got {len(args.inputs)} arguments)"
        )
    return [Path(args.inputs[0])], args.inputs[1]


def run_ask(args: argparse.Namespace) -> int:
    with client_trace(args.command, tree=args.trace):
        return _ask(args)


def _ask(args: argparse.Namespace) -> int:
    # The model's libraries load here, not with the module: `ask --help` must not wait for torch.
    from tqdm import tqdm

    from sharedllm.common.engine.engine import Engine
    from sharedllm.common.runtime import ContextRuntime
    from sharedllm.common.store import open_store

    paths, question = documents_and_question(args)
    texts = [read_document(path) for path in paths]
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
    documents = [engine.tokenize_document(text) for text in texts]
    if len(documents) > 1:
        first_of = {}
        for path, text in zip(paths, texts, strict=True):
            if first_of.setdefault(text, path) != path:
                raise InvalidInput(f"{first_of[text]} and {path} hold the same text; give each document once")
        names = [str(path) for path in paths]
        engine.check_joined(
            names, [len(ids) for ids in documents], [len(engine.compressor.chunk(ids)) for ids in documents]
        )
    # One question per run: a decoded cache would only hold a second copy of what it reads.
    runtime = ContextRuntime(
        engine, open_store("memory://"), default_ttl_s=None, decoded_cache_bytes=0, evidence=evidence
    )
    chunks = sum(len(engine.compressor.chunk(ids)) for ids in documents)
    compressed = []
    with tqdm(total=chunks, desc="compress", unit="chunk", disable=args.json or None, file=sys.stderr) as bar:
        for ids in documents:
            before = bar.n
            compressed.append(
                runtime.compress_ids(ids, progress=lambda done, total, at=before: bar.update(at + done - bar.n))
            )
    context_ids = [c.context_id for c in compressed]
    names = {c.context_id: str(path) for c, path in zip(compressed, paths, strict=True)} if len(paths) > 1 else None

    def streamed():
        for event in runtime.generate(context_ids, question, params, retrieval=not args.no_retrieval):
            if isinstance(event, TokenDelta) and not args.json:
                print(event.text, end="", flush=True)
            yield event

    finished = run_to_end(streamed())
    stored = sum(c.stored_bytes for c in compressed)
    tokens_per_s = finished.tokens_per_s
    report = {
        "answer": finished.text,
        "finish_reason": finished.reason,
        **(
            {"documents": [{"path": str(p), "context_id": c} for p, c in zip(paths, context_ids, strict=True)]}
            if len(paths) > 1
            else {}
        ),
        "document_tokens": sum(c.n_tokens for c in compressed),
        "chunks": sum(c.chunks for c in compressed),
        "stored_bytes": stored,
        "bytes_per_token": round(stored / sum(c.n_tokens for c in compressed), 1),
        # Of all the documents together: stored bytes over their full KV caches', tokens over entries.
        "kv_cache_ratio": round(stored / sum(c.stored_bytes / c.kv_cache_ratio for c in compressed), 4),
        "compression_ratio": round(
            sum(c.n_tokens for c in compressed) / sum(c.n_tokens / c.compression_ratio for c in compressed), 2
        ),
        "bytes_read": finished.context.bytes_read if finished.context else 0,
        "compression_s": round(sum(c.timings.compress_s for c in compressed), 3),
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
        print("\n" + format_citations(finished.text, finished.citations, names))
        print("\n" + format_evidence(finished.evidence, names))
    print(
        f"\n[{'documents' if len(paths) > 1 else 'document'} {report['document_tokens']} tokens in "
        f"{report['chunks']} chunks | "
        f"compression {report['compression_s']} s | stored {report['stored_bytes'] / 1e6:.1f} MB | "
        f"ratio {report['compression_ratio']}x | evidence {report['evidence_tokens']} tokens | "
        f"first token {report['time_to_first_token_s']} s | "
        f"{speed} | finish: {report['finish_reason']}]",
        file=sys.stderr,
    )
    return 0
