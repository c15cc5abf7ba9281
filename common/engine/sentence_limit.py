"""The sentence limit: an answer ends after its first N sentences.

Measured on `sharedllm eval qa` (48 held-out questions): the default model states what it knows
in its first sentence and then rambles, repeats or invents; cutting every answer after its first
sentence lost no right answer (grounded 7 of 48 either way) and no RULER-style point (the
shipped suite's 168 answers score the same). So questions end after one sentence by default;
summaries, which need several, set no limit (0).

A sentence ends at a period, question mark or exclamation mark that follows a word (not a
digit: "3.14", "1. 1858957"; not a common abbreviation: "Mr.", "e.g.") and is followed by white
space or the end. The limit is checked before a token is emitted: when the answer so far ends a
sentence and the new token opens with white space, the answer is complete without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_CONTEXT_TOKENS = 6
_ENDS = re.compile(r"(^|\n)?[ \t]*([A-Za-z]+|\d+)[)\"'”’]*[.!?][)\"'”’]*$")
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "no", "vol", "pp", "cf", "eg", "ie", "fig", "al"}
)


class SentenceLimit:
    def __init__(self, max_sentences: int, decode_text: Callable[[Sequence[int]], str]) -> None:
        self.max_sentences = max_sentences
        self.decode_text = decode_text
        self._ids: list[int] = []
        self.sentences = 0

    def complete_before(self, token: int) -> bool:
        """True: the answer already holds max_sentences sentences and `token` is not part of it.
        False: `token` joins the answer (and is recorded)."""
        if self.max_sentences <= 0:
            return False
        if self._ids:
            context = self._ids[-_CONTEXT_TOKENS:]
            before = self.decode_text(context).rstrip("\ufffd")  # a character still being completed
            opens_with_space = self.decode_text([*context, token])[len(before) : len(before) + 1].isspace()
            if opens_with_space and ends_sentence(before):
                self.sentences += 1
                if self.sentences >= self.max_sentences:
                    return True
        self._ids.append(token)
        return False


def ends_sentence(text: str, after_numbers: bool = False) -> bool:
    """Whether `text` ends with a sentence's closing mark after a word (not an abbreviation).

    after_numbers: a number's period ends a sentence too ("... is: 4403556."), unless the number
    is a list's ordinal ("1." opening a line); False for answers being written, where a number's
    period may still start a list ("1. 1858957").
    """
    found = _ENDS.search(text)
    if found is None:
        return False
    word = found.group(2)
    if word.isdigit():
        return after_numbers and not (found.group(1) is not None and len(word) <= 2)
    return len(word) > 1 and word.lower() not in _ABBREVIATIONS
