"""One decode step of the default model by batch size and dtype: what batching can buy at most.

    python bench/batch_step.py --json bench/results/concurrency/step.json

Every row holds a 600-token cache (a question with its excerpts) and feeds one token; the step
is the layers and the head over all rows at once, as the scheduler's packed step runs them,
without the scheduler around it. Median of 10 steps after 10 warm-up steps, per batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sharedllm.benchmark.report import write_json
from sharedllm.common.engine.engine import Engine

CACHE_TOKENS = 600


def step_seconds(engine: Engine, batch: int) -> float:
    body = engine.body
    cache = body.new_cache(CACHE_TOKENS + 32, batch=batch)
    ids = torch.zeros(batch, 1, dtype=torch.long)
    positions = torch.full((batch, 1), CACHE_TOKENS)
    times = []
    with torch.inference_mode():
        for n in range(20):
            cache.length = CACHE_TOKENS
            started = time.perf_counter()
            body.logits(body.forward_layers(body.embed(ids), positions, range(body.n_layers), cache)[:, -1])
            if n >= 10:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"cache_tokens": CACHE_TOKENS, "threads": args.threads, "runs": []}
    for dtype in args.dtypes:
        engine = Engine.load(dtype=getattr(torch, dtype))
        one = None
        for batch in args.batches:
            seconds = step_seconds(engine, batch)
            one = one or seconds
            run = {
                "dtype": dtype,
                "batch": batch,
                "step_ms": round(seconds * 1000, 1),
                "tokens_per_s": round(batch / seconds, 1),
                "x_batch_1": round(batch * one / seconds, 2),
            }
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
