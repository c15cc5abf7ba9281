"""Sentences a summary never shows, whatever supports them.

A small model asked to summarise writes, besides summary, sentences about the task ("The text
above contains several key points:"), questions back to the reader ("What is the main idea
behind the paragraph?"), list items with nothing after their number, phrases looping until the
token budget ends, near repeats of what it already said, runs in another script, and names
from its training. Each is recognised here by its form, not its topic.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Set

from sharedllm.common.summaries.salience import Vocabulary, content_stems
from sharedllm.common.summaries.units import sentences

_LIST_MARK = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•])\s*")
# Words about the act of summarising rather than the document's content.
_META = re.compile(
    r"\b(?:(?:the|this|that|these|above|given|following|provided) (?:text|passage|document|excerpts?|"
    r"sentences?|paragraphs?|article|summary|story)|summari[sz]\w*|key points|main (?:idea|point)s?|"
    r"in conclusion|in short|overall|as an ai|i (?:can|will|hope|think)|here (?:is|are)|let me|"
    r"you (?:can|may|will|should))\b",
    re.IGNORECASE,
)
LOOP_REPEATS = 3  # one three-word sequence this many times in a sentence: a loop
REPEAT_SHARE = 0.7  # of a sentence's content words already in one earlier sentence: a repeat


def split_sentences(text: str) -> list[str]:
    """Generated text as sentences, list marks removed, empty items gone."""
    out = []
    for piece in sentences(text):
        sentence = _LIST_MARK.sub("", piece).strip()
        if sentence and any(c.isalpha() for c in sentence):
            out.append(sentence)
    return out


def _loops(sentence: str) -> bool:
    words = sentence.lower().split()
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    return bool(trigrams) and max(trigrams.values()) >= LOOP_REPEATS


def rejection(sentence: str, vocabulary: Vocabulary, earlier: Iterable[Set[str]] = ()) -> str | None:
    """Why `sentence` may not be shown (None: it may); earlier: the content stems of the
    sentences kept before it."""
    if sentence.endswith("?"):
        return "a question"
    if sentence[-1] not in ".!\"'”’)]":
        return "unfinished"
    if _META.search(sentence):
        return "about the task, not the document"
    if any(c.isalpha() and not c.isascii() and c not in vocabulary.letters for c in sentence):
        return "letters the document never uses"
    if _loops(sentence):
        return "a loop"
    if vocabulary.unknown_names(sentence):
        return "a name the document does not have"
    if repeats(content_stems(sentence), earlier):
        return "a repeat"
    return None


def repeats(stems: Set[str], earlier: Iterable[Set[str]], share: float = REPEAT_SHARE) -> bool:
    """Whether most of `stems` (by the smaller of the two) were said by one earlier sentence."""
    return any(stems and said and len(stems & said) >= share * min(len(stems), len(said)) for said in earlier)
