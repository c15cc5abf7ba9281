"""Prose questions (docs/evaluation.md): is the answer right, was it in the window, did it loop?

The questions are fixed files (`questions/*.json`, written once and checked by hand): each names
a held-out document (corpus and members, joined with a newline in the order given), its kind
(narrative, reference, technical), and questions whose answer is stated in one sentence of it,
with the accepted answer strings and that sentence (`source`, verbatim).

Methods, all greedy, the same question in the same chat template:
- sharedllm: the product (the tree injected, evidence passages in the window, the answer a quote
  of the document's best-ranked sentences);
- facts: the same window and tree, the model writing with its facts copied from the document;
- free: the same window and tree, free generation (no grounding, no loop guard, no sentence limit);
- anchor: the bare base model given only the answer's own passage (about ANCHOR_CHARS characters
  around `source`, laid out as one excerpt): what the reader does when retrieval is perfect.

Reported per method and kind: right (an accepted string in the answer, case-insensitive), the
answer in the evidence (an accepted string in the window's excerpts), right among those, looping
answers (a run of LOOP_WORDS words said twice), answers cut by the token cap, and answer length.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sharedllm.common.data.corpora import find_entry, load_text
from sharedllm.common.engine.engine import Engine, QuestionPlan
from sharedllm.common.engine.evidence import render
from sharedllm.common.engine.params import EvidenceSettings, SamplingParams, free_generation
from sharedllm.common.engine.results import Finished, Passage, run_to_end
from sharedllm.common.errors import InvalidInput
from sharedllm.common.evaluation.methods import DOCUMENT_METHODS, method_params
from sharedllm.common.evaluation.protocols import QA_MAX_NEW_TOKENS
from sharedllm.common.evaluation.protocols import QA_METHODS as METHODS

KINDS: tuple[str, ...] = ("narrative", "reference", "technical")
ANCHOR_CHARS = 1000
LOOP_WORDS = 4
_WORDS = re.compile(r"\w+")


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class QuestionSet:
    """One document and its questions, as a question file holds them."""

    name: str
    kind: str
    corpus: str
    members: tuple[str, ...]
    questions: tuple[Question, ...]

    def document(self, data_dir: str | Path) -> str:
        return "\n".join(load_text(data_dir, find_entry(data_dir, m, self.corpus)) for m in self.members)


def shipped_question_files() -> list[Path]:
    folder = resources.files("sharedllm.common.evaluation") / "questions"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".json"))


def load_questions(path: Path) -> QuestionSet:
    """Read and check one question file (a malformed one is refused with its name and the reason)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        questions = tuple(
            Question(q["question"], tuple(q["answers"]), q["source"]) for q in raw["questions"] if q["answers"]
        )
        spec = QuestionSet(
            path.stem, raw["kind"], raw["document"]["corpus"], tuple(raw["document"]["members"]), questions
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"question file {path}: {exc}") from None
    if spec.kind not in KINDS or not spec.questions or len(spec.questions) != len(raw["questions"]):
        raise InvalidInput(f"question file {path}: a kind in {KINDS} and questions with accepted answers are needed")
    return spec


@dataclass(frozen=True)
class QaSettings:
    methods: tuple[str, ...] = METHODS
    max_new_tokens: int = QA_MAX_NEW_TOKENS
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)

    def __post_init__(self) -> None:
        if not self.methods or not set(self.methods) <= set(METHODS):
            raise InvalidInput(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {self.methods}")
        if self.max_new_tokens < 1:
            raise InvalidInput("--max-new-tokens must be >= 1")


def is_right(answers: Sequence[str], text: str) -> bool:
    found = text.lower()
    return any(a.lower() in found for a in answers)


def loops(text: str, n: int = LOOP_WORDS) -> bool:
    """Whether some run of `n` words occurs twice in `text` (case-insensitive)."""
    words = [w.lower() for w in _WORDS.findall(text)]
    runs = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(runs) != len(set(runs))


def anchor_passage(document: str, source: str) -> Passage:
    """About ANCHOR_CHARS characters of `document` centred on `source` (which must occur in it)."""
    at = document.find(source)
    if at < 0:
        raise InvalidInput(f"the source sentence is not in the document: {source[:60]!r}")
    start = max(0, at + len(source) // 2 - ANCHOR_CHARS // 2)
    end = min(len(document), start + ANCHOR_CHARS)
    return Passage(0, 0, start, end, document[start:end], 1.0)


def evaluate_qa(engine: Engine, sets: Sequence[QuestionSet], data_dir: str | Path, settings: QaSettings) -> dict:
    """Every question through every method; the JSON-ready report."""
    greedy = SamplingParams(max_new_tokens=settings.max_new_tokens)
    samples: list[dict[str, Any]] = []
    bar = tqdm(total=sum(len(s.questions) for s in sets), desc="qa", file=sys.stderr)
    for spec in sets:
        text = spec.document(data_dir)
        ids = engine.tokenize_document(text)
        tree = engine.compress(ids).tree
        index = engine.passage_index(tree, settings.evidence.passage_tokens)
        for q in spec.questions:
            # One plan per way of answering: a quoted answer's plan holds its spans and no
            # injection; the written methods (facts, free) share the other.
            plans: dict[bool, QuestionPlan] = {}
            runs: dict[str, tuple[QuestionPlan, SamplingParams]] = {}
            for method in (m for m in settings.methods if m in DOCUMENT_METHODS):
                params = method_params(DOCUMENT_METHODS[method], greedy)
                quote = params.grounding == "quote"
                if quote not in plans:
                    plans[quote] = engine.plan(
                        tree,
                        q.question,
                        max_new_tokens=settings.max_new_tokens,
                        evidence=settings.evidence,
                        index=index,
                        quote=quote,
                    )
                runs[method] = (plans[quote], params)
            window = next(iter(plans.values())).evidence if plans else ()
            in_evidence = is_right(q.answers, " ".join(p.text for p in window))
            if "anchor" in settings.methods:
                anchor = engine.prompt_ids(render([anchor_passage(text, q.source)], q.question))
                runs["anchor"] = (QuestionPlan(anchor), free_generation(greedy))
            for method in settings.methods:
                finished: Finished = run_to_end(engine.decode(*runs[method]))
                samples.append(
                    {
                        "document": spec.name,
                        "kind": spec.kind,
                        "question": q.question,
                        "answers": list(q.answers),
                        "method": method,
                        "answer": finished.text,
                        "finish_reason": finished.reason,
                        "right": is_right(q.answers, finished.text),
                        "in_evidence": True if method == "anchor" else in_evidence,
                        "loops": loops(finished.text),
                        "words": len(_WORDS.findall(finished.text)),
                        "citations": [c.to_dict() for c in finished.citations],
                    }
                )
            bar.update(1)
    bar.close()
    return {
        "protocol": {
            **asdict(settings),
            "documents": [{"name": s.name, "kind": s.kind, "members": list(s.members)} for s in sets],
            "scoring": "right: an accepted string in the answer (case-insensitive); loops: a run of "
            f"{LOOP_WORDS} words said twice",
        },
        "summary": summarise(samples, settings.methods),
        "samples": samples,
    }


def summarise(samples: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    kinds = [k for k in KINDS if any(s["kind"] == k for s in samples)]
    for method in methods:
        for kind in [*kinds, "all"]:
            chosen = [s for s in samples if s["method"] == method and kind in (s["kind"], "all")]
            if not chosen:
                continue
            in_evidence = [s for s in chosen if s["in_evidence"]]
            rows.append(
                {
                    "method": method,
                    "kind": kind,
                    "questions": len(chosen),
                    "right": sum(s["right"] for s in chosen),
                    "in_evidence": len(in_evidence),
                    "right_in_evidence": sum(s["right"] for s in in_evidence),
                    "loops": sum(s["loops"] for s in chosen),
                    "capped": sum(s["finish_reason"] == "length" for s in chosen),
                    "guard_stopped": sum(s["finish_reason"] == "repetition" for s in chosen),
                    "mean_words": sum(s["words"] for s in chosen) / len(chosen),
                }
            )
    return rows


def format_table(report: dict[str, Any]) -> str:
    head = (
        f"{'method':>10} {'kind':>10} {'right':>7} {'in evid.':>9} {'right|evid.':>12} "
        f"{'loops':>6} {'capped':>7} {'guard':>6} {'words':>6}"
    )
    lines = [head]
    for r in report["summary"]:
        n = r["questions"]
        lines.append(
            f"{r['method']:>10} {r['kind']:>10} {r['right']:>3}/{n:<3} {r['in_evidence']:>5}/{n:<3} "
            f"{r['right_in_evidence']:>8}/{r['in_evidence']:<3} {r['loops']:>6} {r['capped']:>7} "
            f"{r['guard_stopped']:>6} {r['mean_words']:>6.1f}"
        )
    return "\n".join(lines)
