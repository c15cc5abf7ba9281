"""What every method reads: one long document cut by token count, and two questions about it.

The document is the King James Bible from Ruth onwards (the held-out books first, then the
books that follow them), so it exists on a fresh machine from pip packages alone and reaches
any length measured. Speed does not depend on the text, but a real text keeps answers (and so
the number of decoded tokens) ordinary.
"""

from __future__ import annotations

from itertools import dropwhile

from sharedllm.common.data.corpora import HELDOUT_BIBLE, read_bible
from sharedllm.common.errors import InvalidInput

# The first question on a fresh context, then a different one on the same stored context.
QUESTIONS: tuple[str, str] = (
    "Who anointed David to be king over Israel?",
    "What did Ruth promise Naomi when she would not leave her?",
)


def document_tokens(tokenizer, n_tokens: int) -> list[int]:
    """The first `n_tokens` token ids of the document (books are tokenized only as far as needed)."""
    ids: list[int] = []
    for book in dropwhile(lambda b: b.name != HELDOUT_BIBLE[0], read_bible()):
        ids += tokenizer(book.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise InvalidInput(f"the benchmark document has only {len(ids)} tokens; {n_tokens} were asked for")
