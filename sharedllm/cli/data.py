"""`sharedllm data fetch` and `sharedllm data demo`: the corpora and the demo document on disk."""

from __future__ import annotations

import argparse
import shlex
from collections import defaultdict
from pathlib import Path

from sharedllm.cli.options import add_data_dir_argument
from sharedllm.common.config import cache_root
from sharedllm.common.data.corpora import CORPORA, SPLITS, fetch
from sharedllm.common.data.demo import DEMO_QUESTION, demo_document


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """`data fetch` and `data demo`."""
    data = sub.add_parser(name, help=help_text)
    commands = data.add_subparsers(dest="data_command", required=True)
    fetch_parser = commands.add_parser(
        "fetch", help="write the corpora and their train/held-out manifest into the data directory"
    )
    fetch_parser.add_argument(
        "--corpus",
        action="append",
        choices=CORPORA,
        help="fetch only this corpus (repeatable; default: all)",
    )
    fetch_parser.set_defaults(handler=run_fetch)
    demo_parser = commands.add_parser("demo", help="write the demo document (needs only pip packages)")
    demo_parser.add_argument("--path-only", action="store_true", help="print only the document's absolute path")
    # The demo document is a per-user cache, not data of the working directory: its path must not
    # depend on where `make demo` or a user runs from, nor litter that folder.
    demo_parser.add_argument(
        "--data-dir",
        type=Path,
        default=cache_root(),
        help="write demo/ruth-1samuel.txt under this directory (default: $SHAREDLLM_CACHE_DIR or ~/.cache/sharedllm)",
    )
    demo_parser.set_defaults(handler=run_demo)
    add_data_dir_argument(fetch_parser, "data directory")


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch, then print documents and characters per corpus and split."""
    report = fetch(args.data_dir, tuple(args.corpus or CORPORA))
    documents: dict[tuple[str, str], int] = defaultdict(int)
    chars: dict[tuple[str, str], int] = defaultdict(int)
    for entry in report.entries:
        documents[entry.corpus, entry.split] += 1
        chars[entry.corpus, entry.split] += entry.chars
    print(f"{'corpus':<8} {'split':<8} {'documents':>9} {'characters':>12}")
    for corpus in CORPORA:
        for split in SPLITS:
            if documents[corpus, split]:
                print(f"{corpus:<8} {split:<8} {documents[corpus, split]:>9,} {chars[corpus, split]:>12,}")
    print(f"{'total':<17} {sum(documents.values()):>9,} {sum(chars.values()):>12,}")
    print(f"{args.data_dir}: {report.written} written, {report.unchanged} unchanged, {report.removed} removed")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Write the demo document and show the command that asks the demo question about it.

    The path is printed absolute, so that `sharedllm ask "$(sharedllm data demo --path-only)"`
    works from any folder and a `--data-dir` given relative still names the same file later."""
    path = demo_document(args.data_dir).resolve()
    print(path)
    if args.path_only:
        return 0
    print(f"try: sharedllm ask {shlex.quote(str(path))} {shlex.quote(DEMO_QUESTION)}")
    return 0
