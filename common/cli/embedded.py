"""`sharedllm ask` and `sharedllm summarize`: the whole pipeline in one process, no Redis."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from common.engine.decoder import Finished
from common.engine.engine import SUMMARY_INSTRUCTION, Engine, Limits, adapter_help
from common.engine.evidence import EVIDENCE_MODES, EvidenceSettings, Passage
from common.engine.sampling import SamplingParams
from common.errors import InvalidInput
from common.model_loading import add_dtype_argument, dtype_from_name
from common.runtime import ContextRuntime, GenerateOutcome
from common.store import open_store

MAX_DOCUMENT_BYTES = 64 << 20


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help=adapter_help("the shipped default for the default model"))
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_dtype_argument(parser)
    parser.add_argument(
        "--max-document-tokens",
        type=int,
        help="refuse longer documents (default: 131072, or fewer where chunk positions would pass the window)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-retrieval", action="store_true", help="always expand the most recent half")


def add_evidence_arguments(parser: argparse.ArgumentParser, *, passage_flags: bool = False) -> None:
    """How much of the window holds excerpts of the document, and how they are chosen."""
    default = EvidenceSettings()
    parser.add_argument(
        "--evidence-tokens",
        type=int,
        help=f"document tokens placed in the window as excerpts chosen for the question (default {default.tokens}; "
        "0: none, the tree alone, the paper's setting)",
    )
    parser.add_argument(
        "--evidence-mode",
        choices=EVIDENCE_MODES,
        help="auto: passages ranked for the question; spread: evenly across the document "
        "(default: auto for questions, spread for summaries)",
    )
    if passage_flags:
        parser.add_argument("--passage-tokens", type=int, default=default.passage_tokens, help="passage size")
        parser.add_argument("--evidence-hops", type=int, default=default.hops, help="multi-hop rounds (0: none)")
        parser.add_argument(
            "--tree-weight", type=float, default=default.tree_weight, help="weight of the tree score in the ranking"
        )
        parser.add_argument(
            "--neighbours-of", type=int, default=default.neighbours_of, help="best hits that bring their neighbours"
        )
        parser.add_argument(
            "--min-score",
            type=float,
            default=default.min_score,
            help="leave out passages below this share of the best score (0: fill the budget)",
        )
        parser.add_argument(
            "--inject-excerpts",
            action="store_true",
            help="let the excerpts' own positions read the tree too (default: only the question and answer do)",
        )
        parser.add_argument(
            "--inject-answer",
            action="store_true",
            help="with evidence, let the answer's tokens read the tree too (default: only the question does)",
        )


def evidence_settings(args: argparse.Namespace, mode: str = "auto") -> EvidenceSettings:
    """The settings the evidence flags ask for; unset ones keep EvidenceSettings's defaults."""
    changes = {
        "tokens": args.evidence_tokens,
        "mode": args.evidence_mode or mode,
        "passage_tokens": getattr(args, "passage_tokens", None),
        "hops": getattr(args, "evidence_hops", None),
        "tree_weight": getattr(args, "tree_weight", None),
        "neighbours_of": getattr(args, "neighbours_of", None),
        "min_score": getattr(args, "min_score", None),
        "inject_excerpts": getattr(args, "inject_excerpts", None) or None,
        "inject_answer": getattr(args, "inject_answer", None) or None,
    }
    settings = EvidenceSettings(**{k: v for k, v in changes.items() if v is not None})
    settings.validate()
    return settings


def format_evidence(passages: tuple[Passage, ...]) -> str:
    """The excerpts as a user reads them under an answer: where each one is, then its text."""
    lines = [f"evidence: {len(passages)} passages, {sum(p.n_tokens for p in passages)} tokens"]
    for p in passages:
        lines.append(
            f"  [chars {p.char_start}-{p.char_end}, tokens {p.token_start}-{p.token_end}, score {p.score:.2f}]"
        )
        lines += [f"    {line}" for line in p.text.strip().splitlines() if line.strip()]
    return "\n".join(lines)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    ask = sub.add_parser("ask", help="answer a question about a document (embedded mode)")
    ask.add_argument("document", type=Path)
    ask.add_argument("question")
    summarize = sub.add_parser("summarize", help="summarise a document (embedded mode)")
    summarize.add_argument("document", type=Path)
    for parser in (ask, summarize):
        add_model_arguments(parser)
        add_sampling_arguments(parser)
        add_evidence_arguments(parser)
        parser.add_argument("--evidence", action="store_true", help="print the excerpts the answer read, under it")
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
        parser.set_defaults(handler=run_ask)


def read_document(path: Path) -> str:
    """Read a UTF-8 text file; binary or oversized files are refused with the reason."""
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        raise InvalidInput(f"{path} is {size} bytes; the limit is {MAX_DOCUMENT_BYTES}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if "\x00" in text:
        raise InvalidInput(f"{path} contains NUL bytes; it looks binary, not text")
    if not text.strip():
        raise InvalidInput(f"{path} is empty")
    return text


def run_ask(args: argparse.Namespace) -> int:
    text = read_document(args.document)
    question = getattr(args, "question", None)
    evidence = evidence_settings(args, mode="auto" if question else "spread")
    question = question or SUMMARY_INSTRUCTION
    params = sampling_params(args)
    limits = None if args.max_document_tokens is None else Limits(max_document_tokens=args.max_document_tokens)
    engine = Engine.load(args.model, args.adapter, args.device, limits, dtype=dtype_from_name(args.dtype))
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
    answer: list[str] = []
    finished: Finished | None = None
    outcome: GenerateOutcome | None = None
    for event in runtime.generate(compressed.context_id, question, params, retrieval=not args.no_retrieval):
        if isinstance(event, Finished):
            finished = event
        elif isinstance(event, GenerateOutcome):
            outcome = event
        else:
            answer.append(event.text)
            if not args.json:
                print(event.text, end="", flush=True)
    assert finished is not None and outcome is not None
    decode_s = finished.timings.get("decode_s", 0.0)
    report = {
        "answer": "".join(answer),
        "finish_reason": finished.reason,
        "document_tokens": compressed.n_tokens,
        "chunks": compressed.chunks,
        "stored_bytes": compressed.stored_bytes,
        "bytes_per_token": round(compressed.bytes_per_token, 1),
        "kv_cache_ratio": round(compressed.kv_cache_ratio, 4),
        "compression_ratio": round(compressed.compression_ratio, 2),
        "bytes_read": outcome.bytes_read,
        "compression_s": round(compressed.timings["compress_s"], 3),
        "time_to_first_token_s": round(finished.timings["time_to_first_token_s"], 3),
        "tokens_per_s": round(max(finished.completion_tokens - 1, 0) / decode_s, 2) if decode_s > 0 else None,
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "adapter_trained": engine.trained,
        "evidence_tokens": sum(p.n_tokens for p in finished.evidence),
        "evidence": [p.to_dict() for p in finished.evidence],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print()
        if args.evidence:
            print("\n" + format_evidence(finished.evidence))
        print(
            f"\n[document {report['document_tokens']} tokens in {report['chunks']} chunks | "
            f"compression {report['compression_s']} s | stored {report['stored_bytes'] / 1e6:.1f} MB | "
            f"ratio {report['compression_ratio']}x | evidence {report['evidence_tokens']} tokens | "
            f"first token {report['time_to_first_token_s']} s | "
            f"{report['tokens_per_s']} tokens/s | finish: {report['finish_reason']}]",
            file=sys.stderr,
        )
    return 0
