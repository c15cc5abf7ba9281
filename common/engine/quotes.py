"""Quoted answers: the answer to a question is the document's own sentence that states it.

Why (`sharedllm eval qa`, 48 prose questions over four held-out texts, README): the default model
writes a right answer for 7 of 48 even with the answer's passage in its window (8 when free;
16 given only the answer's own passage), while the sentence around the passage that the
evidence ranking puts first holds the answer for 28 of 48. The 135M model as a judge did not do
better: scoring the three best sentences by the likelihood of the question given each (the
"query likelihood" reranker) picked a right one 29 times, by the likelihood of each sentence as
the answer 21 times. So a question about a document is answered with a quote, and the model
writes only where asked to (grounding "facts" or "off").

What is quoted: for the best-ranked excerpt, and every excerpt scoring at least QUOTE_TIE of it
(several needles of one key, several keys in one question, the links of a chain: at most
MAX_QUOTES), the sentence around the excerpt that shares the most content words with the
question. A sentence ends at a closing mark after a word, or at a blank line; one longer than
MAX_QUOTE_CHARS is cut to that many characters around its excerpt, at word boundaries. The
sentences are quoted best-ranked first (a token cap cuts the weakest), joined by a space.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from sharedllm.common.engine.evidence import terms
from sharedllm.common.engine.results import Passage

QUOTE_TIE = 0.95
MAX_QUOTES = 4
MAX_QUOTE_CHARS = 400
_SENTENCE_END = re.compile(r"(?<=[A-Za-z)\"'”’])[.!?][\"'”’)]*(?=\s)|\n[ \t]*\n")


def quote_spans(question: str, text: str, evidence: Sequence[Passage]) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` (the document) to quote, best-ranked first."""
    if not evidence:
        return []
    best = max(p.score for p in evidence)
    chosen = sorted((p for p in evidence if p.score >= QUOTE_TIE * best), key=lambda p: -p.score)[:MAX_QUOTES]
    asked = set(terms([question])[0])
    spans: list[tuple[int, int]] = []
    for passage in chosen:
        sentences = _sentences_over(text, passage.char_start, passage.char_end)
        if sentences:
            best_sentence = max(sentences, key=lambda s: (len(asked & set(terms([text[s[0] : s[1]]])[0])), -s[0]))
            if not any(a < best_sentence[1] and best_sentence[0] < b for a, b in spans):  # not quoted already
                spans.append(best_sentence)
    return spans


def _sentences_over(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """The sentences that overlap [start, end), stripped, each at most MAX_QUOTE_CHARS long."""
    low, high = max(0, start - MAX_QUOTE_CHARS), min(len(text), end + MAX_QUOTE_CHARS)
    cuts = [low, *(m.end() for m in _SENTENCE_END.finditer(text, low, high)), high]
    found = []
    for a, b in itertools.pairwise(cuts):
        if b <= start or a >= end:
            continue
        a, b = _strip(text, a, b)
        if b - a > MAX_QUOTE_CHARS:
            centre = (max(a, start) + min(b, end)) // 2
            a, b = _strip(text, *_words_within(text, max(a, centre - MAX_QUOTE_CHARS // 2), MAX_QUOTE_CHARS, b))
        if b > a:
            found.append((a, b))
    return found


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def _words_within(text: str, a: int, length: int, limit: int) -> tuple[int, int]:
    """[a, a + length) moved inward to word boundaries (never past `limit`)."""
    b = min(a + length, limit)
    while a < b and not text[a - 1].isspace() and a > 0:
        a += 1
    while b > a and b < limit and not text[b].isspace():
        b -= 1
    return a, b


def quote_text(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """The quoted sentences as the answer reads them: each with its white space runs as one space."""
    return " ".join(" ".join(text[a:b].split()) for a, b in spans)
