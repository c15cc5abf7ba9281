"""What a document is about, counted: its names and its salient terms.

Names. A name is a capitalised word that is neither a common English word nor a word the
document also writes in lower case: "Naomi" and "Bath" are names, "The" and "Lord" (written
"lord" too) are not. Common words come from Debian's wamerican list (declared in the Makefile);
without it, only the document's own lower case tells names apart. The notion is shared by the
summary's checks (no name the document lacks) and by `eval summary` (the ten most frequent
names a summary should mention), so the product promises exactly what is measured.

Terms. A term is a content word (not a stop word, three letters or more) or an identifier
("getLogger", "os.path", "utf_8"), counted by its Snowball stem so that "iterator" and
"iterators" are one term. A term is salient when it is frequent and spread: its count times
the share of the document's sections that use it (a word of one section is that section's, not
the document's). Names are terms too and keep their spelling for display.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import Stemmer
from bm25s.stopwords import STOPWORDS_EN_PLUS

WORDS_FILE = Path("/usr/share/dict/words")
CAPITALISED = re.compile(r"\b[A-Z][a-z]+(?:'[a-z]+)?\b")
_LOWER_WORD = re.compile(r"\b[a-z]+\b")
# A word as terms count it: letters, digits, underscores, with inner dots, apostrophes or hyphens.
TERM_WORD = re.compile(r"[A-Za-z_][\w]*(?:[.'’\-][A-Za-z_]\w*)*|\d[\d.,]*\d|\d")  # words, identifiers, numbers
_STOPWORDS = frozenset(STOPWORDS_EN_PLUS) | frozenset(
    [
        "said",
        "says",
        "say",
        "would",
        "could",
        "should",
        "shall",
        "will",
        "upon",
        "thou",
        "thee",
        "thy",
        "unto",
        "also",
        "one",
        "two",
        "may",
        "might",
        "must",
        "much",
        "many",
        "well",
        "even",
        "every",
        "such",
        "like",
        "made",
        "make",
        "see",
        "know",
        "came",
        "come",
        "went",
        "go",
        "thing",
        "things",
    ]
)
# Titles are capitalised and rarely lower-cased, but name no one by themselves.
_TITLES = frozenset(
    {"Mr", "Mrs", "Ms", "Miss", "Sir", "Lady", "Lord", "Dr", "Captain", "Admiral", "Colonel", "General"}
    | {"King", "Queen", "Prince", "Princess", "Saint", "St"}
)
_local = threading.local()


@cache
def common_words() -> frozenset[str]:
    """Lower-case English words (empty where the word list is not installed)."""
    if not WORDS_FILE.is_file():
        return frozenset()
    words = WORDS_FILE.read_text(encoding="utf-8", errors="replace").split()
    return frozenset(w for w in words if w.islower() and "'" not in w)


def base(word: str) -> str:
    """A name without its possessive."""
    return word.removesuffix("'s").removesuffix("’s")


def stem(word: str) -> str:
    """The lower-cased Snowball stem (one stemmer per thread: PyStemmer's are not thread-safe)."""
    if not hasattr(_local, "stemmer"):
        _local.stemmer = Stemmer.Stemmer("english")
    return _local.stemmer.stemWord(word.lower())


def content_words(text: str) -> list[str]:
    """The words of `text` that carry content: numbers, and words and identifiers of three letters
    or more that are not stop words."""
    return [
        w for w in map(base, TERM_WORD.findall(text)) if (len(w) >= 3 or w[0].isdigit()) and w.lower() not in _STOPWORDS
    ]


def content_stems(text: str) -> set[str]:
    return {stem(w) for w in content_words(text)}


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
        return lower not in self.lower and lower not in common_words() and word not in _TITLES

    def names_in(self, text: str) -> set[str]:
        return {w for w in map(base, CAPITALISED.findall(text)) if self.is_name(w)}

    def unknown_names(self, text: str) -> set[str]:
        """Names in `text` that the document never writes."""
        return self.names_in(text) - self.capitalised


def frequent_names(document: str, top: int, vocabulary: Vocabulary | None = None) -> tuple[str, ...]:
    """The document's `top` most frequent names, most frequent first."""
    vocabulary = vocabulary or Vocabulary.of(document)
    counts = Counter(w for w in map(base, CAPITALISED.findall(document)) if vocabulary.is_name(w))
    return tuple(w for w, _ in counts.most_common(top))


@dataclass(frozen=True)
class Term:
    stem: str
    word: str  # its most frequent spelling in the document
    weight: float


def salient_terms(sections: Sequence[str], top: int) -> tuple[Term, ...]:
    """The `top` terms of the document (given as its sections) by count times spread."""
    counts: Counter[str] = Counter()
    spellings: dict[str, Counter[str]] = {}
    used_in: Counter[str] = Counter()
    for section in sections:
        seen: set[str] = set()
        for word in content_words(section):
            if word[0].isdigit():
                continue  # a number is checked for support, never a subject
            key = stem(word)
            counts[key] += 1
            spellings.setdefault(key, Counter())[word] += 1
            seen.add(key)
        used_in.update(seen)
    n = max(1, len(sections))
    scored = sorted(
        ((counts[k] * used_in[k] / n, k) for k in counts if counts[k] > 1), key=lambda item: (-item[0], item[1])
    )
    return tuple(Term(k, spellings[k].most_common(1)[0][0], round(math.log1p(w), 4)) for w, k in scored[:top])
