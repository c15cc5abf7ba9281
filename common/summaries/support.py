"""Whether a summary sentence says only what its cited spans say, and which spans those are.

A sentence is *supported* when every one of its content words (salience.content_words, by
Snowball stem, so "married" rests on "marry") appears in the document text of the spans it
cites. Only the words that carry content are checked: the words that join them ("the", "was",
"which") are free, which is what lets a model shorten and join sentences. A sentence that adds
a content word its spans lack is dropped, however plausible; it is how a small model's
"a young woman near the mouth of the Mississippi" never reaches a reader.

The spans of a model's sentence are found among the sources of its call (the units, or the
lower level's sentences, that its prompt held): the fewest sources whose words cover the
sentence's, taken greedily, most new words first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sharedllm.common.summaries.salience import content_stems

Span = tuple[int, int]


@dataclass(frozen=True)
class Source:
    """Something a sentence may rest on: document spans and their content words."""

    spans: tuple[Span, ...]
    stems: frozenset[str]


def source_of(document: str, spans: Sequence[Span]) -> Source:
    return Source(tuple(spans), frozenset(content_stems(" ".join(document[a:b] for a, b in spans))))


def cover(sentence: str, sources: Sequence[Source]) -> tuple[Span, ...] | None:
    """The spans of the fewest sources that hold all of `sentence`'s content words, in document
    order; None when no set of them does (the sentence says something they do not)."""
    needed = set(content_stems(sentence))
    if not needed:
        return None  # a sentence of function words says nothing to support
    if not needed <= set().union(*(s.stems for s in sources)):
        return None
    spans: set[Span] = set()
    while needed:
        best = max(sources, key=lambda s: len(needed & s.stems))
        needed -= best.stems
        spans.update(best.spans)
    return tuple(sorted(spans))


def supported(sentence: str, document: str, spans: Sequence[Span]) -> bool:
    """Whether every content word of `sentence` is in the document's text at `spans`."""
    needed = content_stems(sentence)
    return bool(needed) and bool(spans) and needed <= source_of(document, spans).stems
