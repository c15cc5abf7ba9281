"""What the command line does before any work: `--help` of every command at once, and a flag whose
optional package is missing refused in one line.

The commands are read from the parser itself (the command table and every level of sub-commands
under it), so that a new command is checked without being listed here. Timings are measured on a
fresh process, as a user meets them; the deterministic check is that building a command's parser
imports no torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharedllm.cli import COMMANDS, build_parser

HELP_SECONDS = 1.0
TRIES = 3  # the best of up to three runs: the test machine is shared and noisy
HEAVY = ("torch", "transformers")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SHAREDLLM = Path(sys.executable).with_name("sharedllm")  # the console script, as a user runs it

# Build the parser for argv (a command path), show its help, and print the heavy modules it loaded.
IMPORTS_OF_PARSER = f"""
import contextlib, io, sys
from sharedllm.cli import build_parser
argv = sys.argv[1:]
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    build_parser(argv).parse_args([*argv, "--help"])
print(" ".join(m for m in {HEAVY!r} if m in sys.modules))
"""


def _sub_commands(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    yield path
    for action in parser._actions:  # argparse has no public way to list a parser's sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _sub_commands(child, (*path, name))


def command_paths() -> list[tuple[str, ...]]:
    """`()` (plain `sharedllm`), every command of the table, and every sub-command below each."""
    paths: list[tuple[str, ...]] = [()]
    for name in COMMANDS:
        top = next(a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
        paths += _sub_commands(top.choices[name], (name,))
    return paths


PATHS = command_paths()


def _best_help_seconds(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    best, done = float("inf"), None
    for _ in range(TRIES):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=60)
        best = min(best, time.perf_counter() - started)
        if done.returncode != 0 or best < HELP_SECONDS:
            break
    return best, done


def test_every_level_of_sub_commands_is_found():
    assert {("batch", "submit"), ("model", "random"), ("eval", "ruler"), ("serve", "decoder")} <= set(PATHS)
    assert ("ask",) in PATHS and ("data", "demo") in PATHS


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "sharedllm")
def test_help_is_shown_within_a_second(path: tuple[str, ...]):
    seconds, done = _best_help_seconds([str(SHAREDLLM), *path, "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: sharedllm")
    assert seconds < HELP_SECONDS, f"`sharedllm {' '.join(path)} --help` took {seconds:.2f} s"


@pytest.mark.parametrize("path", PATHS, ids=lambda path: " ".join(path) or "sharedllm")
def test_building_the_parser_imports_no_torch(path: tuple[str, ...]):
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS_OF_PARSER, *path], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"building `sharedllm {' '.join(path)}` imported {done.stdout.strip()}"


def test_python_dash_m_serve_help_is_shown_within_a_second():
    seconds, done = _best_help_seconds([sys.executable, "-m", "sharedllm", "serve", "--help"])
    assert done.returncode == 0, done.stderr
    assert seconds < HELP_SECONDS, f"`python -m sharedllm serve --help` took {seconds:.2f} s"


# Run the command line with a package hidden, as if its extra were not installed; then say whether
# torch was loaded, i.e. whether any of the run's work started.
WITHOUT_PACKAGE = """
import sys
sys.modules[sys.argv[1]] = None
from sharedllm.cli import main
status = main(sys.argv[2:])
print("torch loaded" if "torch" in sys.modules else "torch not loaded")
sys.exit(status)
"""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--plot-dir", "figs", "--no-grpc"], "--plot-dir needs matplotlib: pip install 'sharedllm[bench]'"),
        (["eval", "ppl", "--plot", "ppl.png"], "--plot needs matplotlib: pip install 'sharedllm[eval]'"),
        (["eval", "needle", "--plot", "needle.png"], "--plot needs matplotlib: pip install 'sharedllm[eval]'"),
        (["eval", "ruler", "--plot", "ruler.png"], "--plot needs matplotlib: pip install 'sharedllm[eval]'"),
    ],
    ids=["bench --plot-dir", "eval ppl --plot", "eval needle --plot", "eval ruler --plot"],
)
def test_a_missing_extra_is_one_line_before_any_work(argv: list[str], message: str, tmp_path: Path):
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE, "matplotlib", *argv],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=120,
    )
    seconds = time.perf_counter() - started
    assert (done.returncode, done.stderr) == (2, f"sharedllm: error: {message}\n")
    assert done.stdout == "torch not loaded\n"  # refused before the model, or the benchmark, started
    assert seconds < 10
    assert not any(tmp_path.iterdir())  # nothing written
