"""Keep a summary to what its document says: sentences naming what the document never names go.

A small model summarising a section sometimes adds a person or place from its training
(measured: 8 such names in the notes on Judges, README "Batch jobs"), repeats a phrase until
its token budget ends, or drifts into another script. Every sentence of a generated summary is
checked against the document, and one that fails is dropped:
- a name the document does not contain (a capitalised word that is neither a common English
  word nor a word the document writes in lower case, like "Tophusa" in a text about Elkanah);
- a letter the document never uses (another script);
- a phrase looping (one three-word sequence four times or more), or a near repeat of an earlier
  sentence (most of its longer words already said: the model's "The family affairs were entirely
  different... were wholly different... were completely different...");
- an unfinished last sentence (the token budget ran out), when a finished one precedes it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path

WORDS_FILE = Path("/usr/share/dict/words")  # Debian's wamerican (declared in the Makefile)
CAPITALISED = re.compile(r"\b[A-Z][a-z]+(?:'[a-z]+)?\b")
_LOWER_WORD = re.compile(r"\b[a-z]+\b")
_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+[\"')\]]*|$)")
_LOOP_REPEATS = 4
_LONG_WORD = re.compile(r"[a-z]{4,}")
_REPEAT_SHARE = 0.7  # of the shorter sentence's longer words, already in one earlier sentence


@cache
def common_words() -> frozenset[str]:
    """Lower-case English words (empty where the word list is not installed)."""
    if not WORDS_FILE.is_file():
        return frozenset()
    words = WORDS_FILE.read_text(encoding="utf-8", errors="replace").split()
    return frozenset(w for w in words if w.islower() and "'" not in w)


def base(word: str) -> str:
    """A name without its possessive."""
    return word.removesuffix("'s")


@dataclass(frozen=True)
class Vocabulary:
    """What a document writes: its lower-case words, its capitalised words, its letters."""

    lower: frozenset[str]
    capitalised: frozenset[str]
    letters: frozenset[str]

    @classmethod
    def of(cls, document: str) -> Vocabulary:
        return cls(
            frozenset(_LOWER_WORD.findall(document)),
            frozenset(map(base, CAPITALISED.findall(document))),
            frozenset(c for c in document if c.isalpha()),
        )

    def is_name(self, word: str) -> bool:
        """A capitalised word used as a name: not a common word, not one the document lower-cases."""
        lower = word.lower()
        return lower not in self.lower and lower not in common_words()

    def names_in(self, text: str) -> set[str]:
        return {w for w in map(base, CAPITALISED.findall(text)) if self.is_name(w)}

    def unknown_names(self, text: str) -> set[str]:
        return self.names_in(text) - self.capitalised


def _loops(sentence: str) -> bool:
    words = sentence.lower().split()
    trigrams = Counter(zip(words, words[1:], words[2:], strict=False))
    return bool(trigrams) and max(trigrams.values()) >= _LOOP_REPEATS


def _repeats(words: set[str], earlier: list[set[str]]) -> bool:
    return any(
        len(words & other) >= _REPEAT_SHARE * min(len(words), len(other)) for other in earlier if other and words
    )


def grounded(summary: str, vocabulary: Vocabulary) -> str:
    """The summary without the sentences that fail the checks above (possibly empty)."""
    kept: list[str] = []
    said: list[set[str]] = []
    sentences = [s.strip() for s in _SENTENCE.findall(summary) if s.strip()]
    for i, sentence in enumerate(sentences):
        words = set(_LONG_WORD.findall(sentence.lower()))
        unfinished = i == len(sentences) - 1 and sentence[-1] not in ".!?\"')]" and kept
        foreign = any(c.isalpha() and c not in vocabulary.letters for c in sentence)
        if unfinished or foreign or _repeats(words, said) or _loops(sentence) or vocabulary.unknown_names(sentence):
            continue
        said.append(words)
        kept.append(sentence)
    return " ".join(kept)
