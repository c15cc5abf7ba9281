"""What grounded answers cost: time to first token and decode speed, quote and facts against free.

    python bench/grounding_overhead.py --tokens 32768 --repeats 5 --out bench/results/grounding

A 32K-token document (the serving benchmark's) is compressed once in embedded mode. Each of the
workload's questions is asked --repeats times in each grounding mode, alternating: quote (as
shipped: no decoding), facts (the model writes under the fact rule, with the loop guard and the
sentence limit) and free (none of these: answers as before), after one unmeasured round that
builds the document's passage index and its facts (kept with the index, as a server keeps
them). Reported: medians of time to first token (from the request's start, as the runtime
reports it) and of decode tokens/s, their ratios to free, and the one-time cost of building
the facts of a document of each length.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sharedllm.benchmark.workload import QUESTIONS, document_tokens
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.grounding import DocumentFacts
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import open_store


def _median(values: list[float]) -> float | None:
    """None where no answer had two tokens to time (a quote is replayed, not decoded)."""
    return round(statistics.median(values), 2) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(device="cpu")
    runtime = ContextRuntime(engine, open_store("memory://?max_bytes=4294967296"))
    tokens = document_tokens(engine.tokenizer, args.tokens)
    context_id = runtime.compress_ids(tokens).context_id
    shipped = SamplingParams(max_new_tokens=args.max_new_tokens)
    modes = {
        "quote": shipped,
        "facts": dataclasses.replace(shipped, grounding="facts"),
        "free": free_generation(shipped),
    }

    def ask(question: str, params: SamplingParams) -> dict[str, float | int | str | None]:
        finished = run_to_end(runtime.generate(context_id, question, params))
        return {
            "ttft_s": finished.timings.time_to_first_token_s,
            "tokens_per_s": finished.tokens_per_s,
            "tokens": finished.completion_tokens,
            "answer": finished.text,
        }

    for question in QUESTIONS:  # builds the passage index and the facts once, as a server's first question does
        ask(question, shipped)
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for question in QUESTIONS:
            for mode, params in modes.items():
                rows[mode].append({"question": question, **ask(question, params)})
    facts_s = {}
    for n in (args.tokens, 4 * args.tokens):
        text = engine.tokenizer.decode(document_tokens(engine.tokenizer, n))
        started = time.perf_counter()
        DocumentFacts(text)
        facts_s[n] = round(time.perf_counter() - started, 4)
    report: dict = {
        mode: {
            "median_ttft_s": round(statistics.median(r["ttft_s"] for r in found), 4),
            "median_tokens_per_s": _median([r["tokens_per_s"] for r in found if r["tokens_per_s"]]),
            "answers": sorted({r["answer"] for r in found}),
        }
        for mode, found in rows.items()
    }
    free = report["free"]
    for mode in ("quote", "facts"):
        report[f"ttft_ratio_{mode}_free"] = round(report[mode]["median_ttft_s"] / free["median_ttft_s"], 3)
    report["tokens_per_s_ratio_facts_free"] = round(
        report["facts"]["median_tokens_per_s"] / free["median_tokens_per_s"], 3
    )
    report["facts_build_s_by_document_tokens"] = facts_s
    report["protocol"] = vars(args) | {"out": str(args.out) if args.out else None, "questions": list(QUESTIONS)}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "overhead.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
