"""Extractive selection: the units of a document that together cover what it is about.

Each unit is worth the salient terms and names it holds (salience.py), a term counting in full
the first time the selection covers it and a quarter after that, so the selection spreads over
the document's subjects instead of repeating its commonest one. The worth is divided by the
square root of the unit's length (a long unit covers more, but costs more of the bound), and
by the number of units already taken from its section, plus one (so every part of a long
document is heard). A unit too like one already taken (most of its terms said) is skipped.
Units that are not sentences for a reader (lines of code, questions, lines of dialogue in a
narrative) are worth less or nothing.

Sums run over sorted stems: a set's order changes with each process's string hashing, and a sum
in another order can differ in its last bit and break a tie the other way (the batch worker and
`sharedllm summarize` must choose the same sentences).

Greedy, in one pass over the candidates per pick: a 128K-token document has about 8,000
units and a summary takes a few dozen, so this stays well under a second.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cached_property

from sharedllm.common.summaries.salience import Term, content_stems
from sharedllm.common.summaries.units import Unit, is_code_line

REPEAT_SHARE = 0.6  # of a unit's terms already in one unit taken: too like it
COVERED_WEIGHT = 0.25
NAME_WEIGHT = 1.5  # a frequent name is worth more than a frequent word


@dataclass(frozen=True)
class Candidate:
    unit: Unit
    section: int
    stems: frozenset[str]
    quality: float  # 0: never chosen; 1: a plain sentence

    @cached_property
    def ordered(self) -> tuple[str, ...]:
        """The stems sorted, once: sums run over them in this order (see the module docstring)."""
        return tuple(sorted(self.stems))


_DIRECTIVE = re.compile(r"(?:^|\s)\.\. [\w-]+::|^\.\. ")
_FIRST_OR_SECOND_PERSON = re.compile(r"\b(?:I|me|my|we|us|our|you|your)\b")


def _quality(unit: Unit, narrative: bool, entry: bool = False) -> float:
    """How much a reader gets from the unit as a sentence of a summary, 0 to 1 (entry: "headword:
    definition", judged by its definition)."""
    text = unit.text.split(": ", 1)[-1] if entry else unit.text
    if is_code_line(text) or text.endswith("?") or _DIRECTIVE.search(text) or not text[0].isalnum():
        return 0.0  # code, a question, markup, a parenthesis or a fragment
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    if letters < 0.7:
        return 0.0
    if letters < 0.85 or not text[0].isupper() or not text.endswith((".", "!", '"', "”", ")")):
        return 0.4  # a heading, a fragment, or what introduces an example ("... for example:")
    if text.count('"') % 2 or text.count("“") != text.count("”"):
        return 0.4  # cut inside a quotation
    if narrative and (_FIRST_OR_SECOND_PERSON.search(text) or '"' in text or "“" in text):
        return 0.4  # a line of dialogue tells a reader less than the narration around it
    return 1.0


def candidates(
    units: Sequence[Unit], section_starts: Sequence[int], narrative: bool, entries: bool = False
) -> list[Candidate]:
    """The units worth considering, with their section (by start offset) and their terms;
    entries: the units are a reference work's entries ("headword: definition")."""
    out = []
    for unit in units:
        quality = _quality(unit, narrative, entries)
        if quality > 0:
            section = bisect.bisect_right(section_starts, unit.start) - 1
            out.append(Candidate(unit, max(section, 0), frozenset(content_stems(unit.text)), quality))
    return out


def select(
    pool: Sequence[Candidate],
    terms: Sequence[Term],
    names: Sequence[str],
    budget_words: int,
    focus: Collection[str] = (),
) -> list[Candidate]:
    """The chosen candidates, in document order, within `budget_words` words in all. focus: stems
    the reader asked about (a summary's instruction), each worth twice the best term."""
    weights = {t.stem: t.weight for t in terms}
    top = max(weights.values(), default=1.0)
    for stem in focus:
        weights[stem] = 2 * top
    for name in names:
        stem = min(content_stems(name), default=None)  # not a set's first: its order follows hashing
        if stem is not None:
            weights[stem] = max(weights.get(stem, 0.0), 1.0) * NAME_WEIGHT
    covered: set[str] = set()
    per_section: dict[int, int] = {}
    chosen: list[Candidate] = []
    left = list(pool)
    words = 0
    while left:
        best, best_value = None, 0.0
        for c in left:
            if c.unit.words > budget_words - words:
                continue
            gain = sum(weights.get(s, 0.0) * (COVERED_WEIGHT if s in covered else 1.0) for s in c.ordered)
            value = c.quality * gain / math.sqrt(c.unit.words) / (1 + per_section.get(c.section, 0))
            if value > best_value:
                best, best_value = c, value
        if best is None:
            break
        left.remove(best)
        if any(len(best.stems & c.stems) >= REPEAT_SHARE * len(best.stems) for c in chosen):
            continue
        chosen.append(best)
        covered |= best.stems
        per_section[best.section] = per_section.get(best.section, 0) + 1
        words += best.unit.words
    return sorted(chosen, key=lambda c: c.unit.start)
