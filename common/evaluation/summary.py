"""Summaries checked against their document without reference summaries (docs/evaluation.md §6a).

Two questions a reader asks of a summary of a long text: does it name the people and places
the text is about, and does it name anyone the text does not? So:
- the document's names are its capitalised words that are neither common English words nor
  words it also writes in lower case (so "The" and "Lord" are not names, "Naomi" and "Bath"
  are); the ten most frequent are what a summary should mention;
- a name in the summary that the document never contains is invented.
The notion of a name is the grounding filter's (common/batch/grounding.py): the product
promises exactly what this checks. Crude on purpose: counted, not judged, the same for every
method and document.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

from sharedllm.common.batch.grounding import CAPITALISED, Vocabulary, base
from sharedllm.common.errors import InvalidInput

TOP_NAMES = 10


@dataclass(frozen=True)
class SummaryCheck:
    names: tuple[str, ...]  # the document's most frequent names
    mentioned: tuple[str, ...]  # of those, the ones the summary names
    invented: tuple[str, ...]  # names in the summary that the document does not contain

    @property
    def coverage(self) -> int:
        return len(self.mentioned)

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "mentioned": list(self.mentioned),
            "invented": list(self.invented),
            "coverage": f"{self.coverage} of {len(self.names)}",
        }


def document_names(document: str, top: int = TOP_NAMES, vocabulary: Vocabulary | None = None) -> tuple[str, ...]:
    vocabulary = vocabulary or Vocabulary.of(document)
    counts = Counter(w for w in map(base, CAPITALISED.findall(document)) if vocabulary.is_name(w))
    return tuple(w for w, _ in counts.most_common(top))


def check_summary(document: str, summary: str, top: int = TOP_NAMES) -> SummaryCheck:
    vocabulary = Vocabulary.of(document)
    names = document_names(document, top, vocabulary)
    used = vocabulary.names_in(summary)
    return SummaryCheck(
        names=names,
        mentioned=tuple(n for n in names if n in used),
        invented=tuple(sorted(vocabulary.unknown_names(summary))),
    )


@dataclass(frozen=True)
class SummaryDocument:
    name: str
    text: str  # already cut to the evaluated length


def heldout_narratives(data_dir, tokenizer, max_tokens: int) -> list[SummaryDocument]:
    """The held-out narratives, one document per book: Persuasion and each held-out Bible book,
    each cut to its first max_tokens tokens (at a token boundary, decoded back to text)."""
    from sharedllm.common.data.corpora import HELDOUT_AUSTEN, HELDOUT_BIBLE, find_entry, load_text, read_manifest

    fetched = {(e.corpus, e.name) for e in read_manifest(data_dir) if e.split == "heldout"}
    wanted = [("austen", n) for n in sorted(HELDOUT_AUSTEN)] + [("bible", n) for n in HELDOUT_BIBLE]
    documents = []
    for corpus, name in wanted:
        if (corpus, name) not in fetched:
            continue
        text = load_text(data_dir, find_entry(data_dir, name, corpus))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        documents.append(SummaryDocument(name, tokenizer.decode(ids)))
    if not documents:
        raise InvalidInput(f"{data_dir} holds no held-out narrative; run `sharedllm data fetch` first")
    return documents


def evaluate_summaries(
    engine, documents: list[SummaryDocument], max_new_tokens: int = 120, baseline_tokens: int = 8192
) -> dict:
    """Per document: the product's summary (sections, then grounded notes), its notes before
    grounding, and the base model's summary of the document's first tokens that fit its window
    (`baseline_tokens` at most), each checked."""
    import time

    from sharedllm.common.batch.backends import EmbeddedBackend
    from sharedllm.common.batch.summaries import SECTION_INSTRUCTION, summarize
    from sharedllm.common.engine.engine import QuestionPlan
    from sharedllm.common.engine.params import SamplingParams
    from sharedllm.common.engine.results import run_to_end
    from sharedllm.common.runtime import ContextRuntime
    from sharedllm.common.store import open_store

    backend = EmbeddedBackend(ContextRuntime(engine, open_store("memory://"), decoded_cache_bytes=0))
    params = SamplingParams(max_new_tokens=max_new_tokens, repetition_penalty=1.1, max_sentences=0, grounding="facts")
    rows = []
    for doc in documents:
        started = time.perf_counter()
        stored = backend.ensure_context(doc.text)
        summary, notes = summarize(doc.text, functools.partial(_ask_about, backend, stored.context_id, params))
        seconds = time.perf_counter() - started
        suffix = f"\n\n{SECTION_INSTRUCTION}"
        room = min(baseline_tokens, engine.window) - max_new_tokens - len(engine.prompt_ids(suffix)) - 16
        head = engine.tokenizer.decode(engine.tokenizer(doc.text, add_special_tokens=False)["input_ids"][:room])
        head = head[: engine.limits.max_prompt_chars - len(suffix)]  # and what a prompt may hold
        plan = QuestionPlan(engine.prompt_ids(head + suffix))
        baseline = run_to_end(engine.decode(plan, params)).text.strip()
        rows.append(
            {
                "document": doc.name,
                "tokens": stored.tokens,
                "seconds": round(seconds, 1),
                "sharedllm": {**check_summary(doc.text, summary).to_dict(), "summary": summary},
                "notes_before_grounding": check_summary(doc.text, " ".join(notes)).to_dict(),
                "base_window": {**check_summary(doc.text, baseline).to_dict(), "summary": baseline},
            }
        )
    return {"max_new_tokens": max_new_tokens, "documents": rows}


def _ask_about(backend, context_id: str, params, prompt: str) -> str:
    return backend.generate(context_id, prompt, params, evidence_tokens=0)


def format_table(report: dict) -> str:
    lines = [
        f"{'document':<10} {'tokens':>7} {'sharedllm names':>16} {'invented':>9} {'notes invented':>15} "
        f"{'base 8K names':>14} {'invented':>9}"
    ]
    for row in report["documents"]:
        s, n, b = row["sharedllm"], row["notes_before_grounding"], row["base_window"]
        lines.append(
            f"{row['document']:<10} {row['tokens']:>7} {s['coverage']:>16} {len(s['invented']):>9} "
            f"{len(n['invented']):>15} {b['coverage']:>14} {len(b['invented']):>9}"
        )
    return "\n".join(lines)
