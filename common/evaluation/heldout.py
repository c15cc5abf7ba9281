"""The held-out long documents every evaluation reads, one per corpus.

- books: *Persuasion*;
- long plain text: the held-out Bible books (Ruth, 1-2 Samuel, 1-2 Kings), one contiguous
  narrative of which no single book reaches the longest lengths measured (1 Samuel is about
  33K tokens), so they are joined in canonical order into one document of about 130K tokens;
- code and technical prose: the held-out standard-library modules and documentation pages,
  each a few thousand tokens, joined in name order (so a package's modules sit together) into
  one document per corpus: the long input a user has when asking about a code base or a manual.
  Source files and pages end with a newline, so their tokens are joined as they are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sharedllm.common.data.corpora import CORPORA, HELDOUT_AUSTEN, HELDOUT_BIBLE, find_entry, load_text, read_manifest
from sharedllm.common.data.shards import load_shards
from sharedllm.common.errors import InvalidInput


@dataclass(frozen=True)
class HeldoutSource:
    """How one evaluation document is made from a corpus's held-out split."""

    name: str  # as reported
    corpus: str
    members: tuple[str, ...] | None  # in reading order; None: every held-out document, by name


HELDOUT_SOURCES: tuple[HeldoutSource, ...] = (
    HeldoutSource("persuasion", "austen", tuple(sorted(HELDOUT_AUSTEN))),
    HeldoutSource("bible:" + "+".join(HELDOUT_BIBLE), "bible", HELDOUT_BIBLE),
    HeldoutSource("stdlib:held-out modules", "stdlib", None),
    HeldoutSource("pydocs:held-out pages", "pydocs", None),
)


@dataclass(frozen=True)
class HeldoutDocument:
    name: str
    tokens: np.ndarray


def _available(data_dir: str | os.PathLike[str], corpora: Sequence[str] = CORPORA) -> list[HeldoutSource]:
    fetched = {e.corpus for e in read_manifest(data_dir) if e.split == "heldout"}
    found = [s for s in HELDOUT_SOURCES if s.corpus in fetched and s.corpus in corpora]
    if not found:
        raise InvalidInput(
            f"{data_dir} holds none of the held-out documents of {', '.join(corpora)}; "
            f"run `sharedllm data fetch {' '.join('--corpus ' + c for c in corpora)}` first"
        )
    return found


def heldout_documents(
    data_dir: str | os.PathLike[str], tokenizer, corpora: Sequence[str] = CORPORA
) -> list[HeldoutDocument]:
    """Token ids of the held-out document of each of `corpora` fetched into `data_dir`."""
    found = _available(data_dir, corpora)
    shards = load_shards(data_dir, "heldout", tokenizer, sorted({s.corpus for s in found}))
    documents = []
    for source in found:
        members = source.members or sorted(d.name for d in shards.documents if d.corpus == source.corpus)
        parts = [shards.tokens(shards.document(m, source.corpus)) for m in members]
        documents.append(HeldoutDocument(source.name, np.concatenate(parts)))
    return documents


def heldout_book_text(data_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """(name, text) of the first held-out narrative present: the haystack of the natural-text needle."""
    source = _available(data_dir, ("austen", "bible"))[0]
    assert source.members is not None  # the narratives name their members
    return source.name, "\n".join(load_text(data_dir, find_entry(data_dir, m, source.corpus)) for m in source.members)
