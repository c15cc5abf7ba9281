"""A document cut into the units a summary is made of, each with its character span.

A unit is what a reader would quote: a sentence of prose, a line of a list or of a table of
entries, the text of a comment or a docstring in source code. Every unit keeps its span
[start, end) in the document, so whatever a summary takes from it stays traceable.

Blocks are the document's paragraphs (runs of lines between blank lines). A block of prose is
cut into sentences; any other block (code, a list, verse numbers, a table) into its lines.
Units too short to say anything are dropped; long ones are cut at semicolons and colons, and
one still too long is left out (a summary sentence of sixty words reads as a paragraph).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

MIN_WORDS = 5
MAX_WORDS = 60
_BLOCK = re.compile(r"\S(?:.*\S)?(?:\n[ \t]*\S.*)*", re.MULTILINE)  # lines up to a blank line
_LINE = re.compile(r"[^\n]+")
# A sentence ends at . ! or ? (closing quotes and brackets included) before white space and a
# capital, a digit or an opening quote; abbreviations and initials are not ends.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "st",
        "sr",
        "jr",
        "rev",
        "col",
        "gen",
        "capt",
        "lt",
        "prof",
        "no",
        "vol",
        "ch",
        "fig",
        "e.g",
        "i.e",
        "etc",
        "vs",
        "cf",
        "viz",
        "approx",
    ]
)
_CLAUSE_END = re.compile(r"[;:](?=\s)")
_WORD = re.compile(r"\w+(?:[.'’\-]\w+)*")
_SPACE = re.compile(r"\s+")
_CODE_LINE = re.compile(
    r"^\s*(?:def |class |import |from \S+ import|return\b|if .*:$|elif |else:|for .*:$|while .*:$|try:|except\b|"
    r"with .*:$|@\w|[\w.\[\]]+ ?[-+*/|&]?= |[})\]];?$|#include|\w+\(.*\);?$)"
)
# Markup that is not text: reStructuredText roles (":func:`len`" reads "len"), emphasis marks.
_ROLE = re.compile(r":[\w+-]+(?::[\w+-]+){0,3}:`([^`<]*?)(?:\s*<[^`>]*>)?`")  # bounded: no backtracking blow-up
_EMPHASIS = re.compile(r"\*\*|``|(?<!\w)\*(?=\w)|(?<=\w)\*(?!\w)")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>`]+>`_{1,2}")  # reStructuredText's `text <url>`_
_BULLET = re.compile(r"^[*\-•]\s+")
# Source code: the prose in it is its docstrings and comments.
_DOCSTRING = re.compile(r"(?P<quote>\"\"\"|''')(?P<body>.*?)(?P=quote)", re.DOTALL)
_COMMENT = re.compile(r"#+[ \t]?(?P<body>[^\n]*)")


@dataclass(frozen=True)
class Unit:
    """One quotable stretch of the document: its span and its text as a summary shows it."""

    start: int
    end: int
    text: str  # the span with white space collapsed and markup removed

    @property
    def words(self) -> int:
        return len(_WORD.findall(self.text))


def clean(text: str) -> str:
    """Text as a reader sees it: one space for each run of white space, no markup, no bullet."""
    return _BULLET.sub("", _SPACE.sub(" ", _EMPHASIS.sub("", _ROLE.sub(r"\1", _LINK.sub(r"\1", text)))).strip())


def prose_of_code(source: str) -> str:
    """Source code with everything but the text of its docstrings and comments blanked out,
    offsets kept (each blanked character a space, each line break kept), so that the prose
    in it is cut into units like any other and their spans are the source's own."""
    keep = bytearray(len(source))
    for match in _DOCSTRING.finditer(source):
        keep[match.start("body") : match.end("body")] = b"\1" * (match.end("body") - match.start("body"))
    for match in _COMMENT.finditer(source):
        line_start = source.rfind("\n", 0, match.start()) + 1
        if (
            not keep[match.start()]
            and "'" not in source[line_start : match.start()]
            and '"' not in source[line_start : match.start()]
        ):
            keep[match.start("body") : match.end("body")] = b"\1" * (match.end("body") - match.start("body"))
    return "".join(c if k or c == "\n" else " " for c, k in zip(source, keep, strict=True))


def is_code_line(line: str) -> bool:
    return bool(_CODE_LINE.match(line))


def blocks(text: str) -> Iterator[tuple[int, int]]:
    """The spans of the document's paragraphs (runs of non-blank lines)."""
    for match in _BLOCK.finditer(text):
        yield match.start(), match.end()


def _is_prose(block: str) -> bool:
    """A paragraph of running text: lines long enough, few of them code, ending like a sentence
    somewhere."""
    lines = [line for line in block.splitlines() if line.strip()]
    if not lines or sum(is_code_line(line) for line in lines) > len(lines) / 4:
        return False
    if len(lines) == 1:
        return len(_WORD.findall(lines[0])) >= MIN_WORDS and bool(re.search(r"[.!?][\"'”’)]*\s*$", lines[0]))
    return sum(len(line.strip()) for line in lines) / len(lines) >= 40


def _sentence_spans(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    at = start
    for match in _SENTENCE_END.finditer(text, start, end):
        words_before = _WORD.findall(text[max(at, match.start() - 12) : match.start() + 1])
        last = words_before[-1].lower().rstrip(".") if words_before else ""
        if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
            continue
        yield at, match.end()
        at = _past_space(text, match.end(), end)
    if at < end:
        yield at, end


def _past_space(text: str, at: int, end: int) -> int:
    while at < end and text[at].isspace():
        at += 1
    return at


def _clauses(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """A long sentence's clauses (cut after semicolons and colons), merged while short."""
    at = start
    for match in _CLAUSE_END.finditer(text, start, end):
        if len(_WORD.findall(text[at : match.end()])) >= MIN_WORDS * 2:
            yield at, match.end()
            at = _past_space(text, match.end(), end)
    if at < end:
        yield at, end


def first_sentence(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The span of the first sentence of text[start:end] with at least MIN_WORDS words and at
    most MAX_WORDS (None: there is none)."""
    for a, b in _sentence_spans(text, start, end):
        if MIN_WORDS <= len(_WORD.findall(text[a:b])) <= MAX_WORDS:
            return a, b
    return None


def sentences(text: str) -> list[str]:
    """`text` (a model's output) as sentences: by line, then by sentence end."""
    out = []
    for line in _LINE.finditer(text):
        out += [text[a:b].strip() for a, b in _sentence_spans(text, line.start(), line.end())]
    return [s for s in out if s]


def units(text: str) -> list[Unit]:
    """The document's units in document order."""
    out: list[Unit] = []
    for start, end in blocks(text):
        block = text[start:end]
        if _is_prose(block):
            spans = list(_sentence_spans(text, start, end))
        else:
            spans = [(start + m.start(), start + m.end()) for m in _LINE.finditer(block)]
        for low, high in spans:
            pieces = [(low, high)] if len(_WORD.findall(text[low:high])) <= MAX_WORDS else _clauses(text, low, high)
            for a, b in pieces:
                shown = clean(text[a:b])
                if shown.endswith((";", ",")):  # a clause of a longer sentence, shown as a sentence
                    shown = shown.rstrip(";,") + "."
                unit = Unit(a, b, shown)
                if MIN_WORDS <= unit.words <= MAX_WORDS:
                    out.append(unit)
    return out
