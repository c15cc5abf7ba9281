"""Several compressed documents read as one context: one question asked across all of them.

Why it costs nothing to build: every chunk is compressed on its own, its keys stored before any
chunk-level rotary position (docs/method.md §1), so a list of contexts is a longer list of chunks.
Chunk positions are numbered in the order the documents are given; node selection walks every
chunk of every document the same way (D + 1 nodes each), so each document gets the share of the
injection its length earns and no document can crowd another out; the evidence ranking scores
the passages of all documents in one lexical index (one vocabulary, one set of document
frequencies), so the best passage wins wherever it is.

Offsets: the engine works in the joined document's offsets (tokens one after another; characters
as the documents' texts joined by DOCUMENT_SEPARATOR, so no sentence or word runs across a
seam; a citation that would still cross one is dropped). `DocumentMap.localize_passage` and
`localize_citation` turn a passage or citation back into its own document's offsets and name its
context.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from sharedllm.common.config import TreeConfig
from sharedllm.common.engine.results import Citation, Passage
from sharedllm.common.engine.tree import ContextSource, SelectedNodes
from sharedllm.common.errors import IncompatibleContext

# Between two documents' texts, in the joined text that quotes and citations read: a blank line
# ends a sentence (quotes.py) and a word, so nothing is quoted or cited across a seam.
DOCUMENT_SEPARATOR = "\n\n"
# A context id longer than this is shortened in the window's headers (the full id is returned
# with every passage): a 64-character content id would cost ~40 tokens of the window per document.
_HEADER_NAME_CHARS = 24


class JoinedContexts:
    """Contexts read as one ContextSource, their chunks one after another in the order given."""

    def __init__(self, parts: Sequence[ContextSource], names: Sequence[str | None]) -> None:
        if not parts or len(parts) != len(names):
            raise ValueError("JoinedContexts needs one name per context, and at least one context")
        configs = {part.config for part in parts}
        if len(configs) > 1:
            raise IncompatibleContext(
                "the contexts were built with different tree configurations "
                f"({', '.join(sorted(map(str, configs)))}); one question reads contexts of one model and adapter"
            )
        self.parts = tuple(parts)
        self.names = tuple(names)
        self._config = parts[0].config
        lengths = [part.chunk_lengths for part in parts]
        self._chunk_lengths = tuple(n for chunk_lengths in lengths for n in chunk_lengths)
        self.chunk_starts = _starts(len(chunk_lengths) for chunk_lengths in lengths)
        self.token_starts = _starts(sum(chunk_lengths) for chunk_lengths in lengths)

    @property
    def config(self) -> TreeConfig:
        return self._config

    @property
    def chunk_lengths(self) -> tuple[int, ...]:
        return self._chunk_lengths

    @functools.cached_property
    def retrieval_keys(self) -> torch.Tensor:
        return torch.cat([part.retrieval_keys for part in self.parts])

    @functools.cached_property
    def token_ids(self) -> torch.Tensor:
        return torch.cat([part.token_ids for part in self.parts])

    @property
    def index_digest(self) -> bytes:
        """Names the joined document's passages: the parts' own digests, in order."""
        return hashlib.sha256(b"".join(part.index_digest for part in self.parts)).digest()

    @property
    def bytes_read(self) -> int:
        return sum(getattr(part, "bytes_read", 0) for part in self.parts)

    @property
    def cached_nodes(self) -> int:
        return sum(getattr(part, "cached_nodes", 0) for part in self.parts)

    def fetch(self, selection: torch.Tensor) -> SelectedNodes:
        """Each part reads its own chunks' rows; their chunks are renumbered in the joined order."""
        pieces = [
            part.fetch(selection[start : start + len(part.chunk_lengths)])
            for part, start in zip(self.parts, self.chunk_starts, strict=True)
        ]
        return SelectedNodes(
            keys=torch.cat([p.keys for p in pieces], dim=1),
            values=torch.cat([p.values for p in pieces], dim=1),
            counts=torch.cat([p.counts for p in pieces]),
            chunk_of_row=torch.cat(
                [p.chunk_of_row + start for p, start in zip(pieces, self.chunk_starts, strict=True)]
            ),
        )


def _starts(lengths: Iterable[int]) -> tuple[int, ...]:
    """Where each of consecutive runs of these lengths starts."""
    return (0, *itertools.accumulate(lengths))[:-1]


def token_starts_of(source: ContextSource) -> tuple[int, ...]:
    """Where each document of `source` starts in its tokens ((0,) for a single document)."""
    return source.token_starts if isinstance(source, JoinedContexts) else (0,)


def names_of(source: ContextSource) -> tuple[str | None, ...]:
    """The context id of each document of `source` (None for a tree held in memory)."""
    return source.names if isinstance(source, JoinedContexts) else (getattr(source, "context_id", None),)


def join_texts(texts: Sequence[str]) -> tuple[str, tuple[int, ...]]:
    """The documents' texts as the joined text, and where each starts in it."""
    starts = tuple(start + k * len(DOCUMENT_SEPARATOR) for k, start in enumerate(_starts(map(len, texts))))
    return DOCUMENT_SEPARATOR.join(texts), starts


@dataclass(frozen=True)
class DocumentMap:
    """Where each document of a question's context starts, in tokens and characters, and its name.

    names[k] is the context id of document k (None when the engine was given a bare tree).
    """

    names: tuple[str | None, ...]
    token_starts: tuple[int, ...]
    char_starts: tuple[int, ...]

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    def of_token(self, token: int) -> int:
        return bisect.bisect_right(self.token_starts, token) - 1

    def of_char(self, char: int) -> int:
        return bisect.bisect_right(self.char_starts, char) - 1

    def header(self, k: int) -> str:
        """The line that opens document k's excerpts in the window."""
        name = self.names[k]
        if name is None:
            return f"Document {k + 1}:"
        if len(name) > _HEADER_NAME_CHARS:
            name = name[: _HEADER_NAME_CHARS - 1] + "…"
        return f"Document {k + 1} ({name}):"

    def localize_passage(self, passage: Passage) -> Passage:
        k = self.of_token(passage.token_start)
        t, c = self.token_starts[k], self.char_starts[k]
        return dataclasses.replace(
            passage,
            token_start=passage.token_start - t,
            token_end=passage.token_end - t,
            char_start=passage.char_start - c,
            char_end=passage.char_end - c,
            context_id=self.names[k],
        )

    def within_one(self, citation: Citation) -> bool:
        """Whether a cited run lies inside one document (facts read white space as one space, so a
        run of words could match across the seam between two documents; such a run cites neither)."""
        return self.of_char(citation.char_start) == self.of_char(max(citation.char_start, citation.char_end - 1))

    def localize_citation(self, citation: Citation) -> Citation:
        k = self.of_char(citation.char_start)
        c = self.char_starts[k]
        return dataclasses.replace(
            citation, char_start=citation.char_start - c, char_end=citation.char_end - c, context_id=self.names[k]
        )
