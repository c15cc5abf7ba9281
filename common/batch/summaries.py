"""Summaries of long documents: each section with its own text in the window, then the notes
kept to what the document says, in order.

Why this shape (docs/method.md §5a; measured in the README, "Batch jobs"): the small default
model summarises well only what it reads as text; the tree alone gives it the gist of a
document but not its names. So a document is cut into sections that fit the window beside the
instruction, and each section is summarised with its text in the window and the whole
document's tree injected. Combining the notes in one more model call was measured and dropped:
on a 16K-token training book the notes named 7 of its 10 main names and the combined summary
none, looping on one sentence. The summary is the notes, in document order, each sentence
checked against the document (grounding.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from sharedllm.common.batch.grounding import Vocabulary, grounded

SECTION_CHARS = 6000  # about 1,500 tokens of English: room in an 8K window, and a short read for a small model
SECTION_INSTRUCTION = "Summarize the text above in two or three sentences."
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def sections(text: str, max_chars: int = SECTION_CHARS) -> list[str]:
    """The text in consecutive sections of at most max_chars, cut between paragraphs where one
    ends in reach, else between sentences, else at whitespace; none is empty."""
    if max_chars < 200:
        raise ValueError(f"max_chars must be >= 200, got {max_chars}")
    out: list[str] = []
    rest = text.strip()
    while len(rest) > max_chars:
        window = rest[:max_chars]
        cut = window.rfind("\n\n")
        if cut < max_chars // 2:
            ends = [m.end() for m in _SENTENCE_END.finditer(window)]
            cut = ends[-1] if ends and ends[-1] >= max_chars // 2 else window.rfind(" ")
        if cut <= 0:
            cut = max_chars
        out.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        out.append(rest)
    return [s for s in out if s]


def section_prompt(section: str, instruction: str | None) -> str:
    """The section's own text, then what to do with it (the user's instruction, if any, added)."""
    ask = SECTION_INSTRUCTION if not instruction else f"{SECTION_INSTRUCTION} {instruction}"
    return f"{section}\n\n{ask}"


def summarize(
    text: str,
    ask: Callable[[str], str],
    instruction: str | None = None,
    done: Sequence[str] = (),
    on_section: Callable[[list[str], int], None] | None = None,
    max_chars: int = SECTION_CHARS,
) -> tuple[str, list[str]]:
    """(summary, section notes as generated). `ask(prompt)` answers one prompt about the
    document; `done`: notes made before (a resumed task starts after them); `on_section(notes,
    total)` is called after each new one, so progress and partial work can be saved."""
    parts = sections(text, max_chars)
    notes = list(done[: len(parts)])
    for section in parts[len(notes) :]:
        notes.append(ask(section_prompt(section, instruction)).strip())
        if on_section is not None:
            on_section(notes, len(parts))
    vocabulary = Vocabulary.of(text)
    kept = (grounded(note, vocabulary) for note in notes)
    return "\n\n".join(note for note in kept if note), notes
