"""What kind of document this is, and the one line that says so at the top of its summary.

Three kinds, told apart by the shape of the text rather than its words:
- "technical": source code (a quarter or more of its lines are statements, definitions or
  imports) or documentation (headings, directives, literal blocks, inline code);
- "reference": a run of entries, each a short headword line followed by its indented
  definition (a glossary, reStructuredText's definition lists and API directives) or a line
  opening with its headword ("ABASE, v. t. To lower...", "Term: meaning", "Term -- meaning");
- "narrative": everything else (stories, histories, letters, scripture).

Reference is tested before technical, so a glossary of programming terms or a page of API
entries is a reference work (its entries are what it covers) and a tutorial is documentation.
The first line names the kind and what the document covers: a reference work's number and
range of entries and its main subjects, documentation's headings and terms, code's definitions,
a narrative's main names. Every name in it is the document's own.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

from sharedllm.common.summaries.salience import Term
from sharedllm.common.summaries.units import Unit, clean, first_sentence, is_code_line

KINDS = ("narrative", "reference", "technical")
_INDENT = re.compile(r"^[ \t]*")
_HEADWORD_LINE = re.compile(
    r"^(?P<head>[A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]+){0,2})(?:[,.] |\s*$)"  # ABASE, v. t. ... / ABASE
    # Term: meaning / Term -- meaning / - **Term**: meaning (a Markdown glossary)
    r"|^(?:[-*] )?(?P<mark>\*\*|__)?(?P<term>[\w][\w'()\-]*(?: [\w'()\-]+){0,2})(?P=mark)?(?::| --| —| - ) \S"
)
# "Aaron, the eldest son of Amram ...": an entry only in a run of them in alphabetical order
# (a narrative's paragraphs also open with "Anne, however, ...").
_COMMA_HEADWORD = re.compile(r"^(?P<term>[A-Z][\w'\-]*(?: [A-Z][\w'\-]*){0,2}), \S")
_ALPHABETICAL_SHARE = 0.75
_ANY_WORD = re.compile(r"\w+(?:\.\w+)*")  # "mean", "NormalDist.zscore"
_PHRASE_SCAN_CHARS = 200_000_000
# An API entry: ".. function:: name(args)", ".. c:function:: PyObject* PySys_GetObject(const char *name)".
_DIRECTIVE_ENTRY = re.compile(
    r"^\s*\.\. (?:c:|py:|cpp:)?(?:function|class|method|attribute|data|exception|decorator|envvar|option|"
    r"describe|opcode|term|macro|type|var|member)::\s*(?P<signature>[^(\n]+)"
)
_HEADING_RULE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
_MARKDOWN_HEADING = re.compile(r"^#{1,4} (\S.*)$")
_DOC_MARKUP = re.compile(r"^\s*\.\. \w[\w-]*::|::\s*$|``|:\w+:`")
_DEFINITION = re.compile(r"^\s*(?:async )?(?:def|class) (\w+)")
_MIN_ENTRIES = 8
# Lines shaped like headwords that head notes and asides, not entries.
_NOT_HEADWORDS = frozenset({"Note", "Notes", "Warning", "Example", "Examples", "See also", "Summary", "Usage"})


@dataclass(frozen=True)
class Entry:
    """One entry of a reference work: its headword and where its definition starts."""

    headword: str
    start: int  # offset of the line that holds the headword
    body: int  # offset where the definition's text starts (on the same line for "ABASE, v. t. ...")
    inline: bool  # the definition follows the headword on its line


@dataclass(frozen=True)
class DocumentKind:
    kind: str  # one of KINDS
    detail: str  # "source code", "documentation", "glossary or dictionary", "narrative"
    entries: tuple[Entry, ...] = ()  # a reference work's entries, in document order
    headings: tuple[str, ...] = ()  # documentation's section titles, in document order
    definitions: tuple[str, ...] = ()  # source code's classes and functions, in document order


def _lines(text: str) -> list[str]:
    return text.splitlines()


def _indent(line: str) -> int:
    return len(_INDENT.match(line).group().expandtabs(4))


def entries(text: str) -> list[Entry]:
    """The document's entries, in order (see the module docstring)."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    found: list[Entry] = []
    by_comma: list[Entry] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        following = next((k for k in range(i + 1, min(i + 3, len(lines))) if lines[k].strip()), None)
        indented_below = following is not None and _indent(lines[following]) > _indent(line)
        directive = _DIRECTIVE_ENTRY.match(line)
        if directive:
            name = re.findall(r"[\w.]+", directive.group("signature"))
            if name:  # the last word before the arguments: a C signature names its type first
                found.append(Entry(name[-1], offsets[i], _definition_start(lines, offsets, i), False))
            continue
        if (
            len(line.split()) <= 5
            and indented_below
            and not line.rstrip().endswith((".", ":", ",", ";", "?", "!"))
            and not is_code_line(line)
            and not line.lstrip().startswith((".. ", "#", "-", "*", ">", ":"))
        ):
            if clean(line) not in _NOT_HEADWORDS:
                found.append(Entry(clean(line), offsets[i], _definition_start(lines, offsets, i), False))
            continue
        opens_paragraph = i == 0 or not lines[i - 1].strip()
        match = _HEADWORD_LINE.match(line) if _indent(line) == 0 and opens_paragraph else None
        head = (match.group("head") or match.group("term")).strip() if match else None
        if head and head not in _NOT_HEADWORDS:
            found.append(Entry(head, offsets[i], offsets[i], True))
        elif opens_paragraph and (comma := _COMMA_HEADWORD.match(line)):
            by_comma.append(Entry(comma.group("term"), offsets[i], offsets[i], True))
    if len(by_comma) > len(found) and _alphabetical([e.headword for e in by_comma]):
        return sorted(found + by_comma, key=lambda e: e.start)
    return found


def _alphabetical(heads: list[str]) -> bool:
    """Whether most consecutive headwords are in alphabetical order, as a dictionary's are."""
    pairs = list(itertools.pairwise(heads))
    return bool(pairs) and sum(a.lower() <= b.lower() for a, b in pairs) >= _ALPHABETICAL_SHARE * len(pairs)


def _definition_start(lines: list[str], offsets: list[int], i: int) -> int:
    """Where the indented definition below line i starts, past directive options (":noindex:")."""
    for k in range(i + 1, len(lines)):
        stripped = lines[k].strip()
        if stripped and not (stripped.startswith(":") and stripped.count(":") >= 2 and " " not in stripped[:30]):
            return offsets[k] + len(lines[k]) - len(lines[k].lstrip())
    return offsets[-1]


def headwords(text: str) -> list[str]:
    return [e.headword for e in entries(text)]


def entry_units(text: str, found: list[Entry]) -> list[Unit]:
    """Each entry as a unit a summary can show: its headword and the first sentence of its
    definition ("mean: Return the sample arithmetic mean of data."), spanning both."""
    out = []
    for k, entry in enumerate(found):
        limit = found[k + 1].start if k + 1 < len(found) else len(text)
        block_end = text.find("\n\n", entry.body)
        end = min(limit, block_end if block_end >= 0 else len(text))
        sentence = first_sentence(text, entry.body, end)
        if sentence is None:
            continue
        start, stop = sentence
        shown = clean(text[entry.start : stop]) if entry.inline else f"{entry.headword}: {clean(text[start:stop])}"
        out.append(Unit(entry.start, stop, shown))
    return out


def headings(text: str, markdown_too: bool = True) -> list[str]:
    """Section titles: reStructuredText's underlined lines and (markdown_too) Markdown's # lines."""
    lines = _lines(text)
    out = []
    for i, line in enumerate(lines):
        markdown = _MARKDOWN_HEADING.match(line) if markdown_too else None
        if markdown:
            out.append(markdown.group(1).strip())
        elif i > 0 and _HEADING_RULE.match(line) and lines[i - 1].strip() and not _HEADING_RULE.match(lines[i - 1]):
            out.append(lines[i - 1].strip())
    return out


def classify(text: str) -> DocumentKind:
    lines = [line for line in _lines(text) if line.strip()]
    if not lines:
        return DocumentKind("narrative", "narrative")
    code = sum(is_code_line(line) for line in lines) / len(lines)
    titles = headings(text, markdown_too=code < 0.1)  # in source code, "# ..." lines are comments
    markup = sum(bool(_DOC_MARKUP.search(line)) for line in lines) / len(lines)
    documented = markup >= 0.03 or len(titles) >= 3  # examples in documentation are not source code
    symbols = sum(not (c.isalnum() or c.isspace() or c in ".,'-") for c in text) / max(1, len(text))
    if not documented and (code >= 0.25 or (code >= 0.1 and symbols >= 0.06)):
        definitions = tuple(m.group(1) for m in map(_DEFINITION.match, lines) if m)
        return DocumentKind("technical", "source code", definitions=definitions)
    found = entries(text)
    paragraphs = len(re.findall(r"\n\s*\n", text)) + 1
    if len(found) >= _MIN_ENTRIES and len(found) >= 0.1 * min(paragraphs, len(lines) / 3):
        return DocumentKind("reference", "glossary or dictionary", entries=tuple(found))
    if documented:
        return DocumentKind("technical", "documentation", headings=tuple(titles))
    return DocumentKind("narrative", "narrative")


def most_mentioned(text: str, entries: tuple[str, ...], top: int) -> list[str]:
    """The headwords the document mentions most (in other entries too): its main subjects. One
    pass over the text's words; a headword of several words is searched for, up to a bound on the
    text scanned (a dictionary of thousands of entries has few of them)."""
    words = Counter(_ANY_WORD.findall(text))
    phrases = [e for e in dict.fromkeys(entries) if not _ANY_WORD.fullmatch(e)]
    searchable = len(phrases) * len(text) <= _PHRASE_SCAN_CHARS
    counts = {e: words[e] for e in dict.fromkeys(entries)}
    for phrase in phrases:
        counts[phrase] = text.count(phrase) if searchable else 1
    first = {e: i for i, e in reversed(list(enumerate(entries)))}
    return sorted(counts, key=lambda e: (-counts[e], first[e]))[:top]


def _listed(items: list[str]) -> str:
    quoted = [f'"{item}"' if " " in item else item for item in items] or ["none found"]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def overview(text: str, kind: DocumentKind, terms: tuple[Term, ...], names: list[str]) -> tuple[str, list[str]]:
    """The summary's first line (the kind of document and what it covers) and the document's
    words it names (names: the document's most frequent). It states no number: every number of a
    summary is one the document writes."""
    subjects = [t.word for t in terms[:5]]
    if kind.kind == "reference":
        heads = tuple(e.headword for e in kind.entries)
        first, last = heads[0], heads[-1]
        main = most_mentioned(text, heads, 5)
        line = (
            f'A reference work ({kind.detail}) with entries from "{first}" to "{last}"; main subjects: {_listed(main)}.'
        )
        return line, [first, last, *main]
    if kind.detail == "source code":
        named = [n for n in dict.fromkeys(kind.definitions) if not n.startswith("_")] or list(kind.definitions)
        defines = f", defining classes and functions such as {_listed(named[:5])}" if named else ""
        return f"Source code{defines}; main terms: {_listed(subjects)}.", [*named[:5], *subjects]
    if kind.kind == "technical":
        titled = list(dict.fromkeys(kind.headings))
        parts = f', in sections from "{titled[0]}" to "{titled[-1]}"' if len(titled) >= 2 else ""
        line = f"Technical documentation{parts}; main terms: {_listed(subjects)}."
        return line, [*titled[:1], *titled[-1:], *subjects]
    main = names[:5] or subjects
    return f"A narrative whose main names are {_listed(main)}.", main
