"""Quoted answers: the answer to a question is the document's own sentence that states it.

Why (`sharedllm eval qa`, 48 prose questions over four held-out texts, README): the default model
writes a right answer for 7 of 48 even with the answer's passage in its window (8 when free;
16 given only the answer's own passage), while the sentence around the excerpt that the
evidence ranking puts first holds the answer for 28 of 48. The 135M model as a judge did not do
better: scoring the three best sentences by the likelihood of the question given each (the
"query likelihood" reranker) picked a right one 29 times, by the likelihood of each sentence as
the answer 21 times. So a question about a document is answered with a quote, and the model
writes only where asked to (grounding "facts" or "off").

What is quoted: for the best-ranked excerpt, and every excerpt scoring at least QUOTE_TIE of it
(of excerpts ranked alike, the one sharing more of the question's words first), the sentence
around the excerpt that shares the most content words with the question; then, for a
question that names several things (two facts, in one document or in two: documents.py), while
at least two of its content words, and half of those left, are in no quoted sentence, the
sentence of the excerpt holding most of them (`sharedllm eval qa`: 28/48 before and after this
rule). Nothing is
quoted, and the model writes (grounding "facts"), when the question asks for a list ("all",
"every", "list") or more than MAX_QUOTES excerpts tie: several values of one key,
several keys, the links of a chain are said more briefly in a written list than in a quote of
every sentence, which the token cap cuts (RULER-style suite at 8K, 2 samples a task: quotes
alone 80%, with this rule 91%, as the model's grounded answers alone; the prose questions lose
nothing to it).
A sentence ends at a closing mark after a word, or at a blank line; one longer than
`max_chars` (at most MAX_QUOTE_CHARS; the engine fits it to the answer's token cap) keeps that
many characters from a little before its excerpt (a question names what it knows, and the
answer tends to follow), cut at word boundaries. The
sentences are quoted best-ranked first (a token cap cuts the weakest), joined by a space.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from sharedllm.common.engine.evidence import terms
from sharedllm.common.engine.results import Passage
from sharedllm.common.engine.sentence_limit import ends_sentence

QUOTE_TIE = 0.8
MAX_QUOTES = 5
MAX_QUOTE_CHARS = 400
_LIST_WORDS = re.compile(r"\b(?:all|every|list)\b", re.IGNORECASE)
_CLOSING = re.compile(r"[.!?][\"'”’)]*(?=\s)|\n[ \t]*\n")


def quote_spans(
    question: str, text: str, evidence: Sequence[Passage], max_chars: int = MAX_QUOTE_CHARS
) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` (the document) to quote, best-ranked first."""
    if not evidence or _LIST_WORDS.search(question):
        return []
    best = max(p.score for p in evidence)
    if best <= 0:
        return []  # nothing in the window matches the question: no sentence of it answers
    asked = set(terms([question])[0])
    # Best first; of excerpts ranked alike, the one sharing more of the question's words (a hop of
    # the evidence ranking takes the best passage's score, and the best is the one that was asked for).
    chosen = sorted(
        (p for p in evidence if p.score >= QUOTE_TIE * best),
        key=lambda p: (-p.score, -_shared(asked, p.text)),
    )
    if len(chosen) > MAX_QUOTES:
        return []  # the question asks for several things (values, keys, a chain): a written list says them better
    limit = min(max_chars, MAX_QUOTE_CHARS)
    spans: list[tuple[int, int]] = []
    for passage in chosen:
        _quote_best(text, passage, asked, limit, spans)
    # A question that names several things (two facts, in one document or two) gets a sentence for
    # each: while at least two of its words, and half of those left, are in no quoted sentence,
    # the excerpt holding most of them adds its sentence.
    missing = asked - _covered(text, spans)
    while missing and len(spans) < MAX_QUOTES:
        holds = [(_shared(missing, p.text), p.score, p) for p in evidence if p.score > 0]
        count, _, passage = max(holds, key=lambda h: h[:2], default=(0, 0.0, None))
        if (
            passage is None
            or count < max(2, -(-len(missing) // 2))
            or not _quote_best(text, passage, missing, limit, spans)
        ):
            break
        missing -= _covered(text, spans)
    return spans


def _quote_best(text: str, passage: Passage, asked: set[str], max_chars: int, spans: list[tuple[int, int]]) -> bool:
    """Add to `spans` the sentence over `passage` sharing most words with `asked` (unless quoted
    already); whether one was added."""
    sentences = _sentences_over(text, passage.char_start, passage.char_end, max_chars, asked)
    if not sentences:
        return False
    best = max(sentences, key=lambda s: (_shared(asked, text[s[0] : s[1]]), -s[0]))
    if any(a < best[1] and best[0] < b for a, b in spans):  # quoted already
        return False
    spans.append(best)
    return True


def _shared(asked: set[str], text: str) -> int:
    """How many of the question's words `text` holds."""
    return len(asked & set(terms([text])[0]))


def _covered(text: str, spans: Sequence[tuple[int, int]]) -> set[str]:
    return {t for a, b in spans for t in terms([text[a:b]])[0]}


def _sentences_over(
    text: str, start: int, end: int, max_chars: int, asked: set[str] = frozenset()
) -> list[tuple[int, int]]:
    """The sentences that overlap [start, end), stripped, each at most max_chars long (a longer one
    is cut to the part of it that holds most of the `asked` words: _best_part)."""
    low, high = max(0, start - MAX_QUOTE_CHARS), min(len(text), end + MAX_QUOTE_CHARS)
    ends = (m.end() for m in _CLOSING.finditer(text, low, high))
    cuts = [low, *(e for e in ends if text[e - 1] == "\n" or ends_sentence(_line_before(text, e), True)), high]
    found = []
    for a, b in itertools.pairwise(cuts):
        if b <= start or a >= end:
            continue
        a, b = _strip(text, a, b)
        if b - a > max_chars:
            a, b = _best_part(text, a, b, max(a, min(start, b - max_chars) - max_chars // 4), max_chars, asked)
        if b > a:
            found.append((a, b))
    return found


def _best_part(text: str, a: int, b: int, default: int, max_chars: int, asked: set[str]) -> tuple[int, int]:
    """max_chars of the sentence [a, b), cut at words: from `default` (a little before the excerpt),
    or from one of the sentence's line starts where that part holds more of the asked words, or as
    many and runs to the sentence's end (where its statement completes). Why: a sentence can run on
    over line breaks (verses, list items, a line that states one fact), and the part from the
    excerpt's start cut such a fact off before its value."""
    starts = [default] + [a + m.end() for m in re.finditer(r"\n[ \t]*", text[a:b])]
    parts = [_strip(text, *_words_within(text, s, max_chars, b)) for s in starts if a <= s < b]

    def worth(part: tuple[int, int]) -> tuple[int, bool, bool]:
        return _shared(asked, text[part[0] : part[1]]), part[1] == b, part == parts[0]

    return max(parts, key=worth)


def _line_before(text: str, at: int) -> str:
    """The text of the line up to `at` (so that a list's ordinal is seen at the line's start)."""
    return text[text.rfind("\n", 0, at) + 1 : at]


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
