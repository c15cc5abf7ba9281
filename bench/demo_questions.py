"""Questions about the demo document, asked three ways: how the demo question was chosen.

For each question with a known answer in the demo document (Ruth and 1 Samuel 1-12):
- `none`: the base model with the question alone (does it know the answer without the text?);
- `passage`: the base model with the 600 characters around the answer in its window, then the
  question (can it answer when the right passage is in front of it?);
- `product`: `sharedllm ask` with its defaults (tree + evidence), and `evidence`: the same
  excerpts without the tree;
- `retrieved`: whether the text next to the answer is among those excerpts, which tells a
  retrieval miss from a reading miss.
A fair demo question is one that `passage` answers and `none` does not; whether the product
answers it is then the measurement, not the reason for the choice.

    python bench/demo_questions.py --json bench/results/evidence/demo-questions.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sharedllm.cli.options import default_data_dir
from sharedllm.common.data.demo import demo_document
from sharedllm.common.engine.engine import Engine, QuestionPlan
from sharedllm.common.engine.evidence import render
from sharedllm.common.engine.params import EvidenceSettings, SamplingParams
from sharedllm.common.engine.results import Passage, run_to_end

# (question, expected answer, text next to the answer in the document)
QUESTIONS = (
    ("What was the name of Naomi's husband?", "Elimelech", "the name of the man was Elimelech"),
    ("What was the name of Elkanah's other wife?", "Peninnah", "the name of the other Peninnah"),
    ("Who was the mother of Samuel?", "Hannah", "called his name Samuel"),
    ("What was the name of the son of Ruth and Boaz?", "Obed", "called his name Obed"),
    ("What name did the women give to the son of Ruth and Boaz?", "Obed", "called his name Obed"),
    ("Who was the father of Saul?", "Kish", "whose name was Kish"),
    ("In which land did Elimelech and Naomi sojourn during the famine?", "Moab", "sojourn in the country of Moab"),
    ("Which priest served at Shiloh when Hannah prayed?", "Eli", "Eli the priest sat"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.load(device="cpu")
    text = demo_document(args.data_dir).read_text(encoding="utf-8")
    tree = engine.compressor.compress(engine.tokenize_document(text))
    params = SamplingParams(max_new_tokens=32)

    def answer(plan: QuestionPlan) -> str:
        return run_to_end(engine.decode(plan, params)).text

    rows = []
    for question, expected, anchor in QUESTIONS:
        at = text.index(anchor)
        passage = Passage(0, 0, 0, 0, text[max(0, at - 300) : at + 300], 1.0)
        outputs = {
            "none": answer(QuestionPlan(engine.prompt_ids(question))),
            "passage": answer(QuestionPlan(engine.prompt_ids(render([passage], question)))),
        }
        for method, inject in (("product", True), ("evidence", False)):
            plan = engine.plan(tree, question, max_new_tokens=32, evidence=EvidenceSettings(), inject=inject)
            outputs[method] = answer(plan)
        excerpts = "".join(p.text for p in plan.evidence)  # the same passages for both methods
        row = {
            "question": question,
            "expected": expected,
            **{k: expected in v for k, v in outputs.items()},
            "retrieved": anchor in excerpts,  # the answer's sentence reached the window
        }
        rows.append({**row, "outputs": outputs})
        print(json.dumps(row), flush=True)
    fair = [r for r in rows if r["passage"] and not r["none"]]
    summary = {m: f"{sum(r[m] for r in fair)} of {len(fair)}" for m in ("product", "evidence", "retrieved")}
    print(f"fair questions (passage answers, none does not): {len(fair)}; answered: {summary}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"fair": summary, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
