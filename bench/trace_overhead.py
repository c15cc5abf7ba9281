"""Tracing's cost on a repeat question, and one question's trace rendered as text.

    python bench/trace_overhead.py --tokens 32768 --repeats 9 --out bench/results/telemetry

A 32K-token document (the serving benchmark's) is compressed once in embedded mode; the repeat
question is asked --repeats times with tracing off (the API's no-op tracer), then as many times
with the SDK recording every span (exported in batches to an in-memory exporter, so the export's
own I/O is not what is measured), alternating; medians of time to first token and of the whole
answer. The spans of one traced question are written as an indented tree with durations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sharedllm.benchmark.workload import QUESTIONS, document_tokens
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import open_store


def render(spans) -> str:
    """The spans as a tree: name, duration and the attributes an operator filters by."""
    children: dict[int | None, list] = {}
    ids = {s.context.span_id for s in spans}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in ids else None
        children.setdefault(parent, []).append(s)
    lines: list[str] = []

    def walk(parent: int | None, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x.start_time):
            ms = (s.end_time - s.start_time) / 1e6
            attributes = " ".join(f"{k}={v}" for k, v in (s.attributes or {}).items())
            events = " ".join(f"@{e.name}+{(e.timestamp - s.start_time) / 1e6:.1f}ms" for e in s.events)
            lines.append(f"{'  ' * depth}{s.name:<{34 - 2 * depth}} {ms:9.1f} ms  {attributes} {events}".rstrip())
            walk(s.context.span_id, depth + 1)

    walk(None, 0)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(device="cpu")
    runtime = ContextRuntime(engine, open_store("memory://?max_bytes=4294967296"))
    context_id = runtime.compress_ids(document_tokens(engine.tokenizer, args.tokens)).context_id
    params = SamplingParams(max_new_tokens=16)

    def ask() -> tuple[float, float]:
        started = time.perf_counter()
        finished = run_to_end(runtime.generate(context_id, QUESTIONS[1], params))
        return finished.timings.time_to_first_token_s, time.perf_counter() - started

    ask()  # the first question fills the decoded cache; the measured ones are repeats
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sharedllm.common.telemetry import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracers = {"off": trace.NoOpTracer(), "on": provider.get_tracer("sharedllm")}
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode, tracer in tracers.items():
            tracing.tracer = tracer  # what the runtime's spans go through
            results[mode].append(ask())
    provider.force_flush()
    report = {
        mode: {
            "median_ttft_s": round(statistics.median(t for t, _ in rows), 4),
            "median_answer_s": round(statistics.median(a for _, a in rows), 4),
        }
        for mode, rows in results.items()
    }
    report["ttft_ratio_on_off"] = round(report["on"]["median_ttft_s"] / report["off"]["median_ttft_s"], 3)
    spans = exporter.get_finished_spans()
    last_root = max((s for s in spans if s.name == "generate"), key=lambda s: s.start_time)
    one = [s for s in spans if s.context.trace_id == last_root.context.trace_id]
    text = render(one)
    print(json.dumps(report, indent=1))
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"trace-{args.tokens // 1024}k.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
