"""Counting a document's tokens while its text arrives, so an oversized one costs little.

Why: tokenising a whole upload before checking the token limit made a 60 MB document hold a
worker for 93 s and peak at 10 GB. The budget tokenises the text in blocks cut at whitespace
as it arrives and refuses the document as soon as the count passes the limit, so the work and
memory spent on any refused document are bounded by about one limit's worth of tokens.

A token covers at least one byte of UTF-8, so text of at most `limit` bytes cannot pass the
limit and is not counted; past that, every block is, from the first (whatever the script: CJK
text has more tokens than characters). A document that was counted and fits is then tokenised
whole once more for its exact ids (Engine.tokenize_document): about 1% of its compression.
Blocks cut at whitespace tokenise to almost exactly the tokens of the whole text (a cut can
change the count by a token or so, e.g. a prefix space), so the early refusal allows that
much slack per block; the exact check is always the whole text's.
"""

from __future__ import annotations

from sharedllm.common.errors import InvalidInput

BLOCK_CHARS = 1 << 16  # about 15K tokens of prose: ~70 ms to tokenise
SLACK_PER_BLOCK = 2  # tokens a whitespace cut may add or remove
BYTES_PER_TOKEN_BOUND = 16  # the default byte limit per token: 3.5x the worst of the corpora (4.6)


def max_document_bytes(max_document_tokens: int) -> int:
    """The byte limit derived from the token limit: generous for any real text, yet ~30x
    below the old fixed 64 MiB at 128K tokens (2 MiB), so no upload buffers more than that."""
    return BYTES_PER_TOKEN_BOUND * max_document_tokens


class TokenBudget:
    """Feed text in pieces of any size; `add` raises InvalidInput once the tokens exceed `limit`."""

    def __init__(self, tokenizer, limit: int, block_chars: int = BLOCK_CHARS) -> None:
        self._tokenizer = tokenizer
        self._limit = limit
        self._block_chars = block_chars
        self._pending: list[str] = []
        self._pending_chars = 0
        self._received = 0  # UTF-8 bytes added
        self._characters = 0  # characters tokenised so far
        self._blocks = 0
        self.tokens = 0  # counted so far (approximate, see the module docstring)

    def add(self, text: str) -> None:
        self._pending.append(text)
        self._pending_chars += len(text)
        self._received += len(text.encode("utf-8"))
        if not self.counting or self._pending_chars < self._block_chars:
            return
        pending = "".join(self._pending)
        start = 0
        while len(pending) - start >= self._block_chars:
            end = _cut(pending, start + self._block_chars, start)
            self._count(pending[start:end])
            start = end
        self._pending, self._pending_chars = [pending[start:]], len(pending) - start

    @property
    def counting(self) -> bool:
        """Whether the text has grown past what cannot exceed the limit (one byte per token)."""
        return self._received > self._limit

    def finish(self) -> None:
        """Count what is left (the end of the document), if counting has started."""
        if self.counting:
            self._count("".join(self._pending))
        self._pending, self._pending_chars = [], 0

    def _count(self, block: str) -> None:
        if not block:
            return
        self.tokens += len(self._tokenizer(block, add_special_tokens=False)["input_ids"])
        self._characters += len(block)
        self._blocks += 1
        if self.tokens > self._limit + SLACK_PER_BLOCK * self._blocks:
            raise InvalidInput(
                f"document has more than {self._limit} tokens ({self.tokens} counted in its first "
                f"{self._characters} characters); the limit is {self._limit}"
            )


def _cut(text: str, at: int, floor: int) -> int:
    """A cut near `at`: just before the last whitespace in the block's second half (a word
    boundary), or at `at` itself in text without any."""
    space = max(text.rfind(" ", floor, at), text.rfind("\n", floor, at))
    return space if space > floor + (at - floor) // 2 else at
