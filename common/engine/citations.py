"""Citations: the runs of an answer that the document states word for word, and where.

Each run is located in the document (character offsets of its text as its tokens decode),
inside an excerpt of the window where one holds it (the answer copied it from there), else
anywhere in the document (the answer rests on text the window did not show).

A run is the longest stretch of whole words, from a word on, that the document holds; it is
cited when it has at least MIN_WORDS words or states a fact (a number, a name, a term: the
grounding rule), so that "it is" or "the" alone never makes a citation.
"""

from __future__ import annotations

from collections.abc import Sequence

from sharedllm.common.engine.grounding import WORD, DocumentFacts, is_fact, starts_sentence
from sharedllm.common.engine.results import Citation, Passage

MIN_WORDS = 3


def cite(answer: str, facts: DocumentFacts, evidence: Sequence[Passage]) -> tuple[Citation, ...]:
    """The cited runs of `answer`, in answer order; evidence: the excerpts the window held."""
    words = list(WORD.finditer(answer))
    excerpts = _excerpts(evidence)
    within = [(start, end) for start, end, _ in excerpts]
    citations: list[Citation] = []
    i = 0
    while i < len(words):
        best: tuple[int, tuple[int, int]] | None = None
        for j in range(i, len(words)):
            span = facts.locate(answer[words[i].start() : words[j].end()], within)
            if span is None:
                break
            best = (j, span)
        if best is None:
            i += 1
            continue
        j, (start, end) = best
        run = words[i : j + 1]
        if len(run) >= MIN_WORDS or any(
            is_fact(w.group(), starts_sentence(answer, w.start()), facts.lower_words) for w in run
        ):
            holder = next((first for low, high, first in excerpts if low <= start and end <= high), None)
            citations.append(
                Citation(
                    answer_start=words[i].start(),
                    answer_end=words[j].end(),
                    char_start=start,
                    char_end=end,
                    text=facts.text[start:end],
                    evidence_index=holder,
                )
            )
        i = j + 1
    return tuple(citations)


def _excerpts(evidence: Sequence[Passage]) -> list[tuple[int, int, int]]:
    """The window's excerpts as character spans with the index of their first passage: adjacent
    passages read as one excerpt (evidence.render joins them), so a run may cross their seam."""
    merged: list[tuple[int, int, int]] = []
    for i, p in enumerate(evidence):
        if merged and p.char_start == merged[-1][1]:
            merged[-1] = (merged[-1][0], p.char_end, merged[-1][2])
        else:
            merged.append((p.char_start, p.char_end, i))
    return merged
