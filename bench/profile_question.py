"""Where a question's time goes: the runtime's own timings, in-process store against Redis.

    python bench/profile_question.py bench/results/persuasion-32k.txt [--dtype bfloat16] [--json F]

Compresses the document once into each store, then asks the benchmark's first question (every
node read from the store and verified), its second question (nodes both select come from the
decoder's cache), and both again several times (medians). Prints each phase, so the README can
say which part of the time to first token is the model, which the store, which the cache.
Needs `redis-server` on the PATH (a private one is started on a free port).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from sharedllm.benchmark.services import GrpcUnavailable, private_redis
from sharedllm.benchmark.workload import QUESTIONS
from sharedllm.common.config import DTYPE_CHOICES
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.model_loading import dtype_from_name
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import open_store

PHASES = ("context_open_s", "selection_s", "context_load_s", "prepare_s", "prefill_s", "time_to_first_token_s")


def ask(runtime: ContextRuntime, context_id: str, question: str) -> dict[str, float]:
    """One question with one new token: its phases and what it read."""
    finished = run_to_end(runtime.generate(context_id, question, SamplingParams(max_new_tokens=1)))
    assert finished.context is not None
    row = {phase: getattr(finished.timings, phase) for phase in PHASES}
    return {**row, "bytes_read": finished.context.bytes_read, "cached_nodes": finished.context.cached_nodes}


def profile(runtime: ContextRuntime, token_ids: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """The first question (nothing cached), a second question (the nodes both select are cached),
    and both asked again `repeats` times (medians)."""
    context_id = runtime.compress_ids(token_ids).context_id
    first, second = (ask(runtime, context_id, q) for q in QUESTIONS[:2])
    again = [ask(runtime, context_id, q) for _ in range(repeats) for q in QUESTIONS[:2]]
    return {
        "first question": first,
        "second question": second,
        "asked again": {k: statistics.median(r[k] for r in again) for k in again[0]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("document", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(dtype=dtype_from_name(args.dtype))
    token_ids = engine.tokenize_document(args.document.read_text(encoding="utf-8"))
    runtime = ContextRuntime(engine, open_store("memory://?max_bytes=4294967296"))
    results = {"memory": profile(runtime, token_ids, args.repeats)}
    with tempfile.TemporaryDirectory() as workdir:
        try:
            with private_redis(Path(workdir)) as url:
                results["redis"] = profile(ContextRuntime(engine, open_store(url)), token_ids, args.repeats)
        except GrpcUnavailable as exc:
            print(f"profile_question: {exc}", file=sys.stderr)
            return 2
    print(f"{len(token_ids)} document tokens, {engine.body.dtype}, {args.threads} threads; medians in ms")
    print(
        f"{'store':8} {'question':16}" + "".join(f"{p.removesuffix('_s'):>22}" for p in PHASES) + "   MB read  cached"
    )
    for store, by_state in results.items():
        for state, row in by_state.items():
            phases = "".join(f"{row[p] * 1e3:22.1f}" for p in PHASES)
            print(f"{store:8} {state:16}{phases} {row['bytes_read'] / 1e6:9.2f} {row['cached_nodes']:7.0f}")
    if args.json:
        args.json.write_text(
            json.dumps({"tokens": len(token_ids), "dtype": str(engine.body.dtype), **results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
