"""A run's spans as a tree a person reads: the formatter on made-up spans, and `sharedllm ask --trace`
on the tiny model (the tree on stderr, the answer alone on stdout)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

from sharedllm.common.telemetry.span_tree import format_tree

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
TREE_LINE = re.compile(r"^( *)(\S.*?) +(\d+\.\d) ms$")


def made_span(name: str, span_id: int, parent_id: int | None, start_ms: float, end_ms: float) -> ReadableSpan:
    parent = None if parent_id is None else SpanContext(TRACE_ID, parent_id, is_remote=False)
    return ReadableSpan(
        name=name,
        context=SpanContext(TRACE_ID, span_id, is_remote=False),
        parent=parent,
        start_time=round(start_ms * 1e6),
        end_time=round(end_ms * 1e6),
    )


def test_children_are_indented_under_their_parent_in_start_order():
    spans = [
        made_span("sharedllm ask", 1, None, 0.0, 812.3),
        made_span("compress", 2, 1, 5.0, 20.0),
        made_span("lower model and pooling", 3, 2, 6.0, 18.5),
        made_span("generate", 4, 1, 21.9, 812.0),
        made_span("prefill", 5, 4, 22.0, 142.4),
        made_span("decode", 6, 4, 142.4, 811.9),
    ]
    random.Random(0).shuffle(spans)  # the order spans end in, or arrive in, does not matter
    assert format_tree(spans).splitlines() == [
        "sharedllm ask                    812.3 ms",
        "  compress                        15.0 ms",
        "    lower model and pooling       12.5 ms",
        "  generate                       790.1 ms",
        "    prefill                      120.4 ms",
        "    decode                       669.5 ms",
    ]


def test_a_span_whose_parent_is_elsewhere_is_a_root():
    # The caller's span (TRACEPARENT) is not among this process's spans: its child is a root.
    spans = [made_span("second", 7, None, 50.0, 51.0), made_span("sharedllm generate", 8, 99, 0.0, 2.5)]
    assert format_tree(spans).splitlines() == [
        "sharedllm generate        2.5 ms",
        "second                    1.0 ms",
    ]


def test_no_spans_is_no_lines():
    assert format_tree([]) == ""


def test_ask_trace_prints_the_tree_on_stderr_and_only_the_answer_on_stdout(tiny_model_dir, tmp_path: Path):
    document = tmp_path / "doc.txt"
    document.write_text("Naomi lived in Moab with her two sons. " * 40, encoding="utf-8")
    argv = ["ask", str(document), "Where did Naomi live?", "--model", str(tiny_model_dir), "--max-new-tokens", "4"]
    done = subprocess.run(
        [sys.executable, "-m", "sharedllm", *argv, "--trace"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OTEL_TRACES_EXPORTER": "none"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "{" not in done.stdout and "span_id" not in done.stdout
    tree = [(len(m[1]), m[2]) for line in done.stderr.splitlines() if (m := TREE_LINE.match(line))]
    assert tree[0] == (0, "sharedllm ask")
    assert [name for depth, name in tree if depth == 0] == ["sharedllm ask"]
    assert [name for depth, name in tree if depth == 2] == ["compress", "generate"]
    below_generate = [name for depth, name in tree[[n for _, n in tree].index("generate") + 1 :] if depth == 4]
    assert below_generate[-2:] == ["prefill", "decode"]
