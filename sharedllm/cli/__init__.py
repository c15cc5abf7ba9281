"""The `sharedllm` command line: one parser, each subcommand's module loaded only when it runs.

Why lazily: `sharedllm --help` and the light clients (`generate`, `compress`, `data`) must start
at once, not after torch and transformers load; only the command that runs pays for its imports.
Every expected failure is printed as one line and a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from sharedllm.cli.extras import COMMAND_EXTRAS, install_hint
from sharedllm.common.errors import SharedLLMError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Command -> (module that builds its parser with `add_command`, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "ask": ("sharedllm.cli.ask", "answer a question about a document (embedded mode, no services)"),
    "summarize": ("sharedllm.cli.summarize", "summarise a document: its central sentences, each traceable"),
    "compress": ("sharedllm.cli.remote", "compress a document on a compressor service; prints the id"),
    "generate": ("sharedllm.cli.remote", "ask a decoder service about a compressed context; streams"),
    "serve": ("sharedllm.cli.serve", "run a gRPC service (flags also read SHAREDLLM_<FLAG> variables)"),
    "health": ("sharedllm.cli.health", "check a service's gRPC health (exit 0 when SERVING; for container checks)"),
    "batch": ("sharedllm.cli.batch", "batch jobs on Celery: submit documents, follow, fetch results, cancel"),
    "worker": ("sharedllm.cli.worker", "run a Celery worker for batch jobs (model embedded, or the gRPC services)"),
    "data": ("sharedllm.cli.data", "fetch the training and evaluation corpora; write the demo document"),
    "train": ("sharedllm.cli.train", "train an injection adapter (resumes from --run-dir)"),
    "eval": ("sharedllm.cli.evaluate", "perplexity, needle retrieval and the RULER-style suite, with baselines"),
    "bench": ("sharedllm.cli.bench", "speed and memory against full attention and StreamingLLM, in one run"),
    "model": ("sharedllm.cli.model", "prepare the model in the cache (deployments); random models (benchmarks)"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: the named command's real parser, the others as one-line entries."""
    parser = argparse.ArgumentParser(
        prog="sharedllm", description="Answer questions about documents far longer than the model's window."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((word for word in argv if not word.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            _command_module(parser, module).add_command(sub, name, help_text)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def _command_module(parser: argparse.ArgumentParser, module: str):
    """The command's module; a package of an extra that is not installed is named, not a traceback."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        extra = COMMAND_EXTRAS.get(exc.name.split(".")[0] if exc.name else "")
        if extra is None:
            raise
        parser.exit(EXIT_USAGE, f"sharedllm: error: this command needs {install_hint(exc.name, extra)}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; its exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the serving path never downloads
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SharedLLMError as exc:
        print(f"sharedllm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"sharedllm: error: {exc.strerror or exc}: {exc.filename}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sharedllm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
