"""Grounded decoding: what an answer states as a fact is copied from the document.

A 135M model reads well but writes poorly: given the passage that answers a question, it still
invents an acronym's expansion, counts a number up (1934266, 1934267, ...) or names a film the
text never mentions. So while an answer is written, every candidate token is checked against
the document and a token that would state an unsupported fact is never chosen.

The rule. A *fact* of the answer is
- a number: a word with a digit ("1934266", "3.14", "1,000", "utf8");
- a name or a term: a word with an underscore, with a capital after its first character ("NASA",
  "getLogger", "McCoy", "O'Brien"), or with an initial capital where no sentence starts; a
  capitalised word that starts a sentence is a name too, unless it is a common function word
  ("He", "The", "Which": the lexical index's stop words) or the document also writes it in lower
  case (so "Nevertheless" is free where the document has "nevertheless"; "Boaz" is a name);
- a quoted string: the text between straight or curly double quotes, or between backticks.
A number, name or term must be a word of the document, letter for letter; a quoted string must
be a verbatim passage of it (runs of white space count as one space). A word still being
written must be able to become such a word (a prefix of one; a separator at the end may still
join the next part: "1," of "1,934,266"). A list's number opening a line ("1.", "2)") is
structure, not a fact. Everything else (the words that
join facts into a sentence) is written freely. So an answer can never contain a number or a
name the document lacks, and an answer may not stop in the middle of one.
Measured on `sharedllm eval qa` (README): the rule removes invented facts; it does not make a
135M model read better, and it cannot stop sentences made of free words about the document.

How: the candidates are the best `CANDIDATES` tokens by the model's score; each is decoded onto
the answer so far and the words it touches are checked, best first, until enough pass (one for
greedy decoding). Only the answer is constrained, never the prompt.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Collection, Sequence
from functools import cached_property

import torch
from bm25s.stopwords import STOPWORDS_EN_PLUS

CANDIDATES = 64  # tokens checked per step, best first; none passing ends the answer
_CONTEXT_TOKENS = 6  # tokens decoded before a candidate, so that its spacing is right
# A word: letters, digits and underscores, with inner dots, commas, apostrophes or hyphens ("3.14",
# "1,000", "os.path", "O'Brien", "well-known").
WORD = re.compile(r"\w+(?:[.,'’\-]\w+)*")
_SEPARATORS = ".,'’-"
_QUOTES = re.compile(r"[\"“”`]")
_CLOSERS = {'"': '"”', "“": '”"', "`": "`"}  # what closes a quote opened by each mark
_SENTENCE_ENDS = ".!?\n"
_SPACE = re.compile(r"\s+")
_FUNCTION_WORDS = frozenset(w for w in STOPWORDS_EN_PLUS if w.isalpha())  # free as sentence openers in any document


def _flatten(text: str) -> str:
    return _SPACE.sub(" ", text)


def is_fact(word: str, sentence_start: bool, lower_words: Collection[str]) -> bool:
    """Whether `word` states a fact (a number, a name, a term) by the module's rule."""
    if any(c.isdigit() or c == "_" for c in word):
        return True
    if any(c.isupper() for c in word[1:]):
        return True
    if not word[0].isupper() or word == "I":
        return False
    return not sentence_start or word.lower() not in lower_words


class DocumentFacts:
    """The words and the text of one document, as the rule checks them; built once per document."""

    def __init__(self, text: str) -> None:
        self.text = text
        words = set(WORD.findall(text))
        self._words = sorted(words)
        self.lower_words = frozenset(w for w in words if w.islower()) | _FUNCTION_WORDS
        self._lower_sorted = sorted(self.lower_words)

    @cached_property
    def _flat(self) -> str:
        return _flatten(self.text)

    @cached_property
    def _flat_map(self) -> tuple[list[int], list[int]]:
        """Where each run of the flat text starts, in the flat text and in the document: a run is a
        stretch without white space, or one space standing for a stretch of it."""
        flat_starts, starts = [0], [0]
        flat = 0
        for space in _SPACE.finditer(self.text):
            flat += space.start() - starts[-1]  # the stretch before the space, kept as it is
            flat_starts += [flat, flat + 1]
            starts += [space.start(), space.end()]
            flat += 1
        return flat_starts, starts

    def _to_text(self, flat: int) -> int:
        flat_starts, starts = self._flat_map
        k = bisect.bisect_right(flat_starts, flat) - 1
        run_end = starts[k + 1] if k + 1 < len(starts) else len(self.text)
        return min(starts[k] + flat - flat_starts[k], run_end)

    def _to_flat(self, at: int) -> int:
        flat_starts, starts = self._flat_map
        k = bisect.bisect_right(starts, at) - 1
        return flat_starts[k] + (0 if k % 2 else at - starts[k])  # odd runs are white space: their one space

    def locate(self, text: str, within: Sequence[tuple[int, int]] = ()) -> tuple[int, int] | None:
        """The document's character span [start, end) of `text` (white space runs count as one
        space): its first occurrence inside the first of the spans `within` that holds it, else
        its first occurrence anywhere; None if the document does not hold it."""
        needle = _flatten(text).strip()
        if not needle:
            return None
        for low, high in within:
            found = self._find(needle, self._to_flat(low), self._to_flat(high))
            if found >= 0:
                break
        else:
            found = self._find(needle, 0, len(self._flat))
        if found < 0:
            return None
        return self._to_text(found), self._to_text(found + len(needle) - 1) + 1

    def has_word(self, word: str) -> bool:
        i = bisect.bisect_left(self._words, word)
        return i < len(self._words) and self._words[i] == word

    def has_prefix(self, prefix: str, lower: bool = False) -> bool:
        words = self._lower_sorted if lower else self._words
        i = bisect.bisect_left(words, prefix)
        return i < len(words) and words[i].startswith(prefix)

    def has_passage(self, text: str) -> bool:
        needle = _flatten(text).strip()
        return not needle or self._find(needle, 0, len(self._flat)) >= 0

    def _find(self, needle: str, low: int, high: int) -> int:
        """The first occurrence of `needle` in the flat text within [low, high) that does not start
        or end inside a word ("12" is not found in "2012", "he was" not in "she was"); -1 if none."""
        flat = self._flat
        found = flat.find(needle, low, high)
        while found >= 0:
            end = found + len(needle)
            cuts_in = (found > 0 and needle[0].isalnum() and flat[found - 1].isalnum()) or (
                end < len(flat) and needle[-1].isalnum() and flat[end].isalnum()
            )
            if not cuts_in:
                return found
            found = flat.find(needle, found + 1, high)
        return -1

    def valid(self, text: str, since: int = 0, final: bool = False) -> bool:
        """Whether `text` (an answer, after its prefix) obeys the rule in every word that ends at or
        after `since`; final=True: nothing more will be written (the last word must be whole)."""
        for match in WORD.finditer(text, max(0, _word_start(text, since))):
            word, end = match.group(), match.end()
            if _is_ordinal(text, match.start(), end, final):
                continue
            start_of_sentence = starts_sentence(text, match.start())
            # A separator that ends the text may still join the next word ("1," of "1,934,266").
            open_word = word + text[end] if end == len(text) - 1 and text[end] in _SEPARATORS else word
            if not final and end >= len(text) - (len(open_word) - len(word)):
                if not self._may_become_valid(open_word, start_of_sentence) and not (
                    open_word != word and self._whole_word_valid(word, start_of_sentence)
                ):
                    return False
            elif not self._whole_word_valid(word, start_of_sentence):
                return False
        return self._quotes_valid(text, since, final)

    def _whole_word_valid(self, word: str, start_of_sentence: bool) -> bool:
        return not is_fact(word, start_of_sentence, self.lower_words) or self.has_word(word)

    def _may_become_valid(self, word: str, start_of_sentence: bool) -> bool:
        """A word still being written: some continuation of it passes the rule."""
        if not is_fact(word, start_of_sentence, self.lower_words) or self.has_prefix(word):
            return True
        # A capitalised sentence opener ("Neve") may still become a free word ("Nevertheless")
        # if the document writes some word starting so in lower case.
        only_initial_capital = not any(c.isdigit() or c == "_" or c.isupper() for c in word[1:]) and word[0].isalpha()
        return start_of_sentence and only_initial_capital and self.has_prefix(word.lower(), lower=True)

    def _quotes_valid(self, text: str, since: int, final: bool) -> bool:
        opened: int | None = None
        for mark in _QUOTES.finditer(text):
            at, char = mark.start(), mark.group()
            if opened is None:
                if char in _CLOSERS:
                    opened, closers = at, _CLOSERS[char]
            elif char in closers:
                if at >= since and not self.has_passage(text[opened + 1 : at]):
                    return False
                opened = None
        return opened is None or (not final and self.has_passage(text[opened + 1 :]))


def _word_start(text: str, at: int) -> int:
    """The start of the word that holds or ends at `at` (so a check from there sees it whole)."""
    while at > 0 and (text[at - 1].isalnum() or text[at - 1] in "_" + _SEPARATORS):
        at -= 1
    return at


def _is_ordinal(text: str, start: int, end: int, final: bool) -> bool:
    """A list's number ("1." or "2)" opening a line, its item following): structure, not a fact.
    A bare "47." that ends the answer is an answer, and checked as one."""
    line_start = text.rfind("\n", 0, start) + 1
    if not (end - start <= 2 and text[start:end].isdigit() and not text[line_start:start].strip()):
        return False
    if end >= len(text) or text[end] not in ".)":
        return False
    item = text[end + 1 :].split("\n", 1)[0]
    return bool(item.strip()) or (not final and end + 1 == len(text))


def starts_sentence(text: str, at: int) -> bool:
    """Whether the word at `at` opens a sentence (of the answer, or of the text that precedes it)."""
    before = text[:at].rstrip(" \t\"'“‘(*-")
    return not before or before[-1] in _SENTENCE_ENDS


class GroundedAnswer:
    """The constraint on one answer while it is written: `restrict` the logits, then `accept` the token."""

    def __init__(
        self,
        facts: DocumentFacts,
        decode_text: Callable[[Sequence[int]], str],
        end_ids: Collection[int],
        prefix: str = "",
    ) -> None:
        self.facts = facts
        self.decode_text = decode_text
        self.end_ids = frozenset(end_ids)
        self._prefix = prefix.rstrip() + " " if prefix.strip() else ""
        self._ids: list[int] = []
        self.text = self._prefix  # the answer so far, after the prefix

    def _extended(self, token: int) -> str:
        context = self._ids[-_CONTEXT_TOKENS:]
        # A character split over tokens decodes as U+FFFD until its last byte arrives; self.text
        # holds none of it until then, so the delta is measured from before it.
        before = (self.decode_text(context) if context else "").rstrip("\ufffd")
        after = self.decode_text([*context, token])
        if not after.startswith(before):  # the tokenizer respaced the context: no clean delta
            return self.text
        return self.text + after[len(before) :].rstrip("\ufffd")

    def allows(self, token: int, final: bool = False) -> bool:
        """Whether appending `token` keeps the answer within the rule (final: it is the last token)."""
        if token in self.end_ids:
            return self.facts.valid(self.text, len(self._prefix), final=True)
        since = max(len(self._prefix), len(self.text) - 1)
        return self.facts.valid(self._extended(token), since, final)

    def restrict(self, logits: torch.Tensor, keep: int, final: bool = False) -> torch.Tensor:
        """Logits with -inf everywhere but the best `keep` allowed tokens.

        The top CANDIDATES are checked first; only when none of them is allowed is the rest of the
        vocabulary checked, best first, for the first allowed one (an end token passes whenever the
        answer is whole, so the search ends early in practice).
        """
        top = torch.topk(logits, min(CANDIDATES, logits.numel())).indices.tolist()
        allowed = _first(top, lambda t: self.allows(t, final), keep)
        if not allowed:
            rest = torch.argsort(logits, descending=True)[len(top) :].tolist()
            allowed = _first(rest, lambda t: self.allows(t, final), 1) or top[:1]
        out = torch.full_like(logits, float("-inf"))
        index = torch.tensor(allowed, device=logits.device)
        return out.index_copy_(0, index, logits.index_select(0, index))

    def accept(self, token: int) -> None:
        if token in self.end_ids:
            return
        self.text = self._extended(token)
        self._ids.append(token)


def _first(items: Sequence[int], test: Callable[[int], bool], n: int) -> list[int]:
    found: list[int] = []
    for item in items:
        if test(item):
            found.append(item)
            if len(found) == n:
                break
    return found
