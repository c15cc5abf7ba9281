"""Growing a context: which stored chunks an append keeps, and which tokens it encodes.

Chunks are compressed independently (docs/method.md §1), so text added to a document changes
only its last chunk, if that one was partial, and adds new ones after it: every other chunk's
tree stays as stored. The tokens are those the whole text would give where the added text starts
at a word boundary: the stored last chunk is decoded, the new text appended to it and the result
tokenized again, so a word or a run of white space that continues across the seam is tokenized as
one. Where the stored last chunk does not tokenize back to itself (it starts inside a word, or
inside a character), the cut moves back a chunk at a time until it does, at most MAX_CHUNKS_BACK
chunks; past that (token ids no tokenizer would give), the stored ids stay as they are and the new
text is tokenized on its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sharedllm.common.errors import InvalidInput

# How many chunks before the last the cut may move back to find one that tokenizes back to itself.
MAX_CHUNKS_BACK = 3


@dataclass(frozen=True)
class AppendPlan:
    """kept_chunks chunks stay as stored (kept_tokens tokens); tail_ids follow them, to encode."""

    kept_chunks: int
    kept_tokens: int
    tail_ids: list[int]


def plan_append(
    stored_ids: Sequence[int],
    chunk_lengths: Sequence[int],
    chunk_size: int,
    tokenizer: Any,
    *,
    text: str | None = None,
    ids: Sequence[int] | None = None,
) -> AppendPlan:
    """What appending `text` (or token ids `ids`) to a stored document encodes."""
    if (text is None) == (ids is None):
        raise ValueError("append text or token ids, one of them")
    if not (text if text is not None else ids):
        raise InvalidInput("nothing to append: the text is empty")
    starts = [0, *itertools.accumulate(chunk_lengths)]
    last = len(chunk_lengths) - 1
    cut = last  # the first chunk encoded again
    if ids is not None:
        tail = [*stored_ids[starts[cut] :], *ids]
    else:
        candidates = range(last, max(-1, last - MAX_CHUNKS_BACK - 1), -1)
        safe = next((c for c in candidates if _round_trips(stored_ids[starts[c] :], tokenizer)), None)
        if safe is None:  # no safe cut near the end (stored ids no tokenizer would give): leave them as stored
            tail = [*stored_ids[starts[last] :], *tokenizer(text, add_special_tokens=False)["input_ids"]]
        else:
            cut = safe
            before = tokenizer.decode(list(stored_ids[starts[cut] :]), clean_up_tokenization_spaces=False)
            tail = tokenizer(before + text, add_special_tokens=False)["input_ids"]
    # A full chunk the new tokens leave as it was stays as stored (text after a full last chunk).
    while (
        cut < len(chunk_lengths)
        and chunk_lengths[cut] == chunk_size
        and tail[:chunk_size] == list(stored_ids[starts[cut] : starts[cut + 1]])
    ):
        tail = tail[chunk_size:]
        cut += 1
    if not tail:
        raise InvalidInput("nothing to append: the text adds no token")
    return AppendPlan(cut, starts[cut], tail)


def _round_trips(ids: Sequence[int], tokenizer: Any) -> bool:
    """Whether the tokens decode to text that tokenizes back to them (a safe place to cut)."""
    text = tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
    return "\ufffd" not in text[:1] and tokenizer(text, add_special_tokens=False)["input_ids"] == list(ids)
