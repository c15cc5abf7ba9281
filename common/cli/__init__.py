"""The `sharedllm` command line: one parser, subcommands registered by their modules.

Every expected failure is printed as one line and a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from common.errors import SharedLLMError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    from common.benchmark.cli import add_bench_commands
    from common.cli import embedded
    from common.data.cli import add_data_commands
    from common.evaluation.cli import add_eval_commands
    from common.random_model import add_model_commands
    from common.rpc.cli import add_rpc_commands
    from common.training.cli import add_train_commands

    parser = argparse.ArgumentParser(
        prog="sharedllm",
        description="Answer questions about documents far longer than the model's window.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    embedded.add_commands(sub)
    add_data_commands(sub)
    add_train_commands(sub)
    add_eval_commands(sub)
    add_bench_commands(sub)
    add_rpc_commands(sub)
    add_model_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None, build: Callable[[], argparse.ArgumentParser] = build_parser) -> int:
    """Parse and run one command; `build` gives the parser (a narrower one needs fewer packages)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars are noise on a user's terminal
    args = build().parse_args(argv)
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
