"""`sharedllm summarize`: a document's summary by the library's one pipeline, in this process.

Batch jobs make the same summary for the same document and settings (common/summaries). By
default it is extractive: the document's own sentences, chosen to cover what it is about, so
no model loads. `--rewrite` lets the model join them (the document is compressed first, so the
model reads it through its injected tree), and keeps only the sentences the document supports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sharedllm.cli.ask import MODEL, read_document
from sharedllm.cli.evidence import format_sources
from sharedllm.cli.observability import client_trace
from sharedllm.common.summaries.pipeline import DEFAULT_WORDS, SummarySettings, Writer, summarize


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("document", type=Path)
    parser.add_argument(
        "--words",
        type=int,
        default=DEFAULT_WORDS,
        help=f"its length bound, first line included ({DEFAULT_WORDS})",
    )
    parser.add_argument("--instruction", help="what to focus on (e.g. 'the risks'): its words weigh more")
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="let the model join the chosen sentences, keeping those the document supports (loads the model)",
    )
    MODEL.add_arguments(parser.add_argument_group("model (with --rewrite)"))
    parser.add_argument(
        "--evidence", action="store_true", help="print, under the summary, the document's spans each sentence rests on"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object: sentences, their spans, kind")
    parser.add_argument("--trace", action="store_true", help="print this run's spans on stderr, as a tree")
    parser.set_defaults(handler=run_summarize)


def run_summarize(args: argparse.Namespace) -> int:
    with client_trace(args.command, tree=args.trace):
        return _summarize(args)


def _summarize(args: argparse.Namespace) -> int:
    settings = SummarySettings(words=args.words, instruction=args.instruction, rewrite=args.rewrite)
    text = read_document(args.document)
    started = time.perf_counter()
    write = _model_writer(args, text) if args.rewrite else None
    summary = summarize(text, write, settings)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"document": str(args.document), **summary.to_dict(), "seconds": round(seconds, 2)}, indent=2))
        return 0
    print(summary.text)
    if args.evidence:
        print("\n" + format_sources(text, summary))
    calls = f" | {len(summary.calls)} model calls" if args.rewrite else ""
    print(f"\n[{summary.kind} ({summary.detail}) | {summary.words} words | {seconds:.1f} s{calls}]", file=sys.stderr)
    return 0


def _model_writer(args: argparse.Namespace, text: str) -> Writer:
    """The model, reading the compressed document, as the pipeline calls it (the batch worker's
    embedded backend makes the same calls)."""
    from tqdm import tqdm

    from sharedllm.common.engine.engine import Engine
    from sharedllm.common.engine.results import run_to_end
    from sharedllm.common.runtime import ContextRuntime
    from sharedllm.common.store import open_store

    engine = Engine.from_choice(MODEL.from_args(args))
    runtime = ContextRuntime(engine, open_store("memory://"), default_ttl_s=None, decoded_cache_bytes=0)
    ids = engine.tokenize_document(text)
    chunks = -(-len(ids) // engine.adapter.config.chunk_size)
    with tqdm(total=chunks, desc="compress", unit="chunk", disable=args.json or None, file=sys.stderr) as bar:
        context_id = runtime.compress_ids(ids, progress=lambda done, total: bar.update(done - bar.n)).context_id

    def write(prompt, params):
        return run_to_end(runtime.generate(context_id, prompt, params, evidence_tokens=0)).text

    return write
