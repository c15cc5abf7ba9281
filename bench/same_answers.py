"""Answers of the default model alone and batched, token for token.

    python bench/same_answers.py --json bench/results/concurrency/same-answers.json

Three training-split Bible books cut to 8,192 tokens, three questions each; every answer is
asked first alone (one at a time through the scheduler: prompts read whole, one row a step)
and then all nine at once (prompts in pieces, batched steps), greedy, free and grounded, up to
96 tokens. The suite checks the logits bit for bit on its tiny model; this checks the default
model's answers, with its own shapes and kernels.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sharedllm.benchmark.report import write_json
from sharedllm.common.data.corpora import read_bible
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.engine.results import TokenDelta
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store.memory import MemoryStore

BOOKS = ("Genesis", "Exodus", "Judges")
QUESTIONS = ("Who is the main person of this text?", "What happens at the end?", "Where does the story take place?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load()
    runtime = ContextRuntime(engine, MemoryStore())
    texts = {book.name: book.text for book in read_bible()}
    contexts = [
        runtime.compress_ids(engine.tokenizer(texts[name], add_special_tokens=False)["input_ids"][:8192]).context_id
        for name in BOOKS
    ]
    work = [(context_id, question) for context_id in contexts for question in QUESTIONS]
    engine.start_batching()
    report = {"books": BOOKS, "questions": QUESTIONS, "runs": []}
    for mode in ("free", "grounded"):
        params = SamplingParams(max_new_tokens=96)
        params = free_generation(params) if mode == "free" else params

        def tokens(request: tuple[str, str], params: SamplingParams = params) -> list[int]:
            events = runtime.generate(*request, params)
            return [e.token_id for e in events if isinstance(e, TokenDelta) and e.token_id is not None]

        alone = [tokens(request) for request in work]
        with ThreadPoolExecutor(len(work)) as pool:  # all at once: their steps are batched
            together = list(pool.map(tokens, work))
        run = {
            "mode": mode,
            "answers": len(work),
            "identical": sum(a == b for a, b in zip(alone, together, strict=True)),
            "tokens_alone": [len(a) for a in alone],
        }
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
