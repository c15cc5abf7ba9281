"""Planted codes: the check a new user makes first, through the same runtime `sharedllm ask` uses.

A 4-digit code is planted at a paragraph boundary of held-out prose (Persuasion) at three
depths in documents of 12K, 24K and 48K tokens, and asked for by name. Each document is
compressed and asked once per evidence budget (0 is the paper's setting: the question alone
in the window). Prints one line per document and writes JSON.

    python bench/planted_codes.py --json bench/results/evidence/planted-codes.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from sharedllm.cli.options import default_data_dir
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.evaluation.heldout import heldout_book_text
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import open_store

NAMES = ("Sapphire Archive", "north boathouse", "Harbour Chapel", "copper vault", "old granary", "west tower")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--lengths", type=int, nargs="+", default=[12_288, 24_576, 49_152])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(device="cpu")
    runtime = ContextRuntime(engine, open_store("memory://"), decoded_cache_bytes=0)
    haystack, text = heldout_book_text(args.data_dir)
    book = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    rows = []
    for length in args.lengths:
        for depth in args.depths:
            code, name = str(rng.randrange(1000, 10_000)), rng.choice(NAMES)
            start = rng.randrange(0, len(book) - length)
            document = engine.tokenizer.decode(book[start : start + length])
            at = document.find("\n\n", int(depth * len(document)))
            at = at + 2 if at >= 0 else int(depth * len(document))
            document = f"{document[:at]}The {name} code is {code}.\n\n{document[at:]}"
            context_id = runtime.compress_text(document).context_id
            question = f"What is the {name} code?"
            for budget in args.budgets:
                started = time.perf_counter()
                events = runtime.generate(
                    context_id, question, SamplingParams(max_new_tokens=24), evidence_tokens=budget
                )
                finished = run_to_end(events)
                row = {
                    "length": length,
                    "depth": depth,
                    "code": code,
                    "evidence_tokens": budget,
                    "answer": finished.text,
                    "correct": code in finished.text,
                    "seconds": round(time.perf_counter() - started, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {b: sum(r["correct"] for r in rows if r["evidence_tokens"] == b) for b in args.budgets}
    total = len(args.lengths) * len(args.depths)
    for budget, hits in summary.items():
        print(f"evidence_tokens={budget}: {hits} of {total}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "haystack": haystack,
            "summary": {str(b): h for b, h in summary.items()},
            "total": total,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
