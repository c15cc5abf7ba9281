"""A decode step in a model thread, with and without another thread's OpenMP pool alive.

    python bench/thread_pools.py --json bench/results/concurrency/thread-pools.json

Each case runs in a fresh process: the model is loaded in the main thread, either with torch's
threads (its OpenMP pool stays alive, as a server's loading thread's did) or single-threaded
(`threads.keep_single_threaded`, what a batching decoder does now); then a second thread takes
the threads (`threads.use`) and times packed decode steps of B rows over 600-token caches, as
the scheduler's thread runs them. Median of 10 steps after 4 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CACHE_TOKENS = 600
CASES = ("pool alive", "single-threaded elsewhere")


def measure(case: str, threads: int, batches: list[int]) -> dict[str, float]:
    import torch

    from sharedllm.common.engine import threads as torch_threads
    from sharedllm.common.engine.engine import Engine

    torch.set_num_threads(threads)
    if case == CASES[1]:
        torch_threads.keep_single_threaded()
    engine = Engine.load()
    torch.ones(1 << 16).sum()  # the main thread's own work (loading already ran parallel regions)
    result: dict[str, float] = {}

    def model_thread() -> None:
        torch_threads.use(threads)
        decoder, body = engine.decoder, engine.body
        for batch in batches:
            caches = [body.new_cache(CACHE_TOKENS + 32) for _ in range(batch)]
            times = []
            with torch.inference_mode():
                for n in range(14):
                    for cache in caches:
                        cache.length = CACHE_TOKENS
                    started = time.perf_counter()
                    decoder.step_rows([[5]] * batch, caches, [None] * batch)
                    if n >= 4:
                        times.append(time.perf_counter() - started)
            result[str(batch)] = round(statistics.median(times) * 1000, 1)

    worker = threading.Thread(target=model_thread)
    worker.start()
    worker.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each case, alternating")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.threads, args.batches)))
        return
    from sharedllm.benchmark.report import write_json

    runs = []
    for _ in range(args.repeats):
        for case in CASES:
            command = [sys.executable, __file__, "--case", case, "--threads", str(args.threads), "--batches"]
            out = subprocess.run([*command, *map(str, args.batches)], capture_output=True, text=True, check=True)
            run = {"case": case, "step_ms": json.loads(out.stdout.splitlines()[-1])}
            runs.append(run)
            print(json.dumps(run), flush=True)
    medians = {
        case: {
            b: round(statistics.median(r["step_ms"][b] for r in runs if r["case"] == case), 1)
            for b in map(str, args.batches)
        }
        for case in CASES
    }
    report = {"threads": args.threads, "cache_tokens": CACHE_TOKENS, "runs": runs, "median_step_ms": medians}
    print(json.dumps(medians))
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
