"""The held-out long documents every evaluation reads: *Persuasion* and the held-out Bible books.

The Bible's held-out books (Ruth, 1-2 Samuel, 1-2 Kings) are one contiguous narrative but
none alone reaches the longest lengths measured (1 Samuel is about 33K tokens), so they are
always joined, in canonical order, into one document of about 130K tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from common.data.corpora import HELDOUT_AUSTEN, HELDOUT_BIBLE, find_entry, load_text, read_manifest
from common.data.shards import load_shards
from common.errors import InvalidInput

# (reported name, corpus, member documents in reading order)
HELDOUT_DOCUMENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("persuasion", "austen", tuple(sorted(HELDOUT_AUSTEN))),
    ("bible:" + "+".join(HELDOUT_BIBLE), "bible", HELDOUT_BIBLE),
)


@dataclass(frozen=True)
class HeldoutDocument:
    name: str
    tokens: np.ndarray


def _available(data_dir: str | os.PathLike[str]) -> list[tuple[str, str, tuple[str, ...]]]:
    corpora = {e.corpus for e in read_manifest(data_dir) if e.split == "heldout"}
    found = [d for d in HELDOUT_DOCUMENTS if d[1] in corpora]
    if not found:
        raise InvalidInput(
            f"{data_dir} holds neither Persuasion nor the held-out Bible books; "
            "run `sharedllm data fetch --corpus austen --corpus bible` first"
        )
    return found


def heldout_documents(data_dir: str | os.PathLike[str], tokenizer) -> list[HeldoutDocument]:
    """Token ids of each held-out document present in `data_dir` (only their corpora are tokenized)."""
    found = _available(data_dir)
    shards = load_shards(data_dir, "heldout", tokenizer, sorted({corpus for _, corpus, _ in found}))
    return [
        HeldoutDocument(name, np.concatenate([shards.tokens(shards.document(m, corpus)) for m in members]))
        for name, corpus, members in found
    ]


def heldout_book_text(data_dir: str | os.PathLike[str]) -> tuple[str, str]:
    """(name, text) of the first held-out document present: the haystack of the natural-text needle."""
    name, corpus, members = _available(data_dir)[0]
    return name, "\n".join(load_text(data_dir, find_entry(data_dir, m, corpus)) for m in members)
