"""Questions per second of one decoder service on this machine, for capacity planning.

    python bench/decoder_load.py --tokens 32768 --questions 24 --concurrency 1 2 4

A private redis-server and both services (the default model and adapter); one document of
--tokens tokens (the serving benchmark's: the Bible from Ruth on) is compressed once, then --questions questions
(the benchmark's two, alternating; 32 new tokens each, greedy, decoded freely) are sent at each concurrency.
Reported: questions per second, and the median time to the first token as the client sees it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sharedllm.benchmark.report import write_json
from sharedllm.benchmark.services import grpc_stack
from sharedllm.benchmark.workload import QUESTIONS, document_tokens
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.engine.results import TokenDelta
from sharedllm.common.rpc.client import CompressorClient, DecoderClient


def ask(target: str, api_key: str, context_id: str, question: str, max_new_tokens: int) -> float:
    """One question, decoded freely to the token cap (a quote would time no decoding); seconds to
    its first token."""
    params = free_generation(SamplingParams(max_new_tokens=max_new_tokens))
    with DecoderClient(target, api_key=api_key) as decoder:
        started = time.perf_counter()
        first = None
        for event in decoder.generate(context_id, question, params):
            if isinstance(event, TokenDelta) and event.token_id is not None and first is None:
                first = time.perf_counter() - started
        return first if first is not None else time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from sharedllm.common.model_loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    tokens = document_tokens(tokenizer, args.tokens)
    report = {"tokens": args.tokens, "threads": args.threads, "max_new_tokens": args.max_new_tokens, "runs": []}
    with tempfile.TemporaryDirectory() as workdir, grpc_stack(Path(workdir), [], args.threads, ["load"]) as targets:
        api_key = targets.api_keys["load"]
        with CompressorClient(targets.compressor, api_key=api_key) as compressor:
            context_id = compressor.compress(tokens).context_id
        ask(targets.decoder, api_key, context_id, QUESTIONS[0], args.max_new_tokens)  # warm the decoded cache
        for concurrency in args.concurrency:
            questions = [QUESTIONS[i % 2] for i in range(args.questions)]
            started = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                ttfts = list(
                    pool.map(lambda q: ask(targets.decoder, api_key, context_id, q, args.max_new_tokens), questions)
                )
            seconds = time.perf_counter() - started
            run = {
                "concurrency": concurrency,
                "questions_per_s": round(len(questions) / seconds, 3),
                "median_ttft_s": round(statistics.median(ttfts), 3),
            }
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
