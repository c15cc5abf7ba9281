"""The scheduler's prompt budget per step (`--prefill-chunk`), in process, under clients asking at once.

    python bench/prefill_chunk.py --chunks 64 512 1024 --clients 1 8 16 \
        --json bench/results/concurrency/prefill-chunk.json

One engine with the default model, set up as the batching decoder service sets itself up (only
the scheduler's thread keeps torch's threads); an 8K-token document compressed once; at each
chunk size, C threads ask a question each at the same moment through the runtime, every answer
decoded freely to 256 tokens. No gRPC and no client processes: the scheduler's trade alone
(the figures `sharedllm bench --concurrency` reports: aggregate tokens/s, time to first token
and inter-token latency, p50 and p95).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from sharedllm.benchmark.load import Answered, level_figures, timed
from sharedllm.benchmark.report import write_json
from sharedllm.benchmark.workload import QUESTIONS, document_tokens
from sharedllm.common.engine import threads as torch_threads
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.engine.scheduler import Scheduler
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store.memory import MemoryStore


def level(runtime: ContextRuntime, context_id: str, clients: int, params: SamplingParams) -> dict[str, Any]:
    """`clients` threads asking at once through the runtime; the level's figures, as over gRPC."""
    answers = [Answered() for _ in range(clients)]

    def client(index: int) -> None:
        timed(runtime.generate(context_id, QUESTIONS[index % len(QUESTIONS)], params), answers[index])

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return level_figures(clients, answers, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 512, 1024])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_threads = torch_threads.keep_single_threaded()
    engine = Engine.load()
    runtime = ContextRuntime(engine, MemoryStore())
    context_id = runtime.compress_ids(document_tokens(engine.tokenizer, 8192)).context_id
    params = free_generation(SamplingParams(max_new_tokens=args.max_new_tokens))
    runs = []
    for chunk in args.chunks:
        engine.scheduler = Scheduler(engine.decoder, prefill_chunk=chunk, threads=model_threads)
        for _ in runtime.generate(context_id, QUESTIONS[0], params):  # warm
            pass
        for clients in args.clients:
            run = {"prefill_chunk": chunk, **level(runtime, context_id, clients, params)}
            runs.append(run)
            print(json.dumps(run), flush=True)
        engine.scheduler.close()
    if args.json:
        write_json({"max_new_tokens": args.max_new_tokens, "threads": args.threads, "runs": runs}, args.json)


if __name__ == "__main__":
    main()
