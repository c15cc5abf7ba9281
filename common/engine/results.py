"""What a question and a compression give back: typed events, timings and usage, with no torch.

One final event per answer (`Finished`) carries everything a front end reports, so the
servicer, the CLI, the benchmark and the evaluations read the same named fields and a renamed
phase is a type error, not a KeyError at run time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class CompressTimings:
    """Seconds per phase of one compression; total_s runs from the request's start."""

    tokenize_s: float = 0.0  # zero when the caller sent token ids
    compress_s: float = 0.0  # the lower model and pooling
    store_s: float = 0.0  # serialisation and the store write
    total_s: float = 0.0


@dataclass(frozen=True)
class CompressOutcome:
    """What storing one document gave: its id, its size and what it cost."""

    context_id: str
    reused: bool  # the same document was stored already (same tenant, model, adapter): nothing was computed
    n_tokens: int
    chunks: int
    stored_bytes: int
    bytes_per_token: float
    kv_cache_ratio: float  # stored bytes / the base model's full KV cache for the same tokens
    compression_ratio: float  # document tokens per entry one question injects
    timings: CompressTimings


@dataclass(frozen=True)
class AppendOutcome:
    """What growing a stored context gave: the whole context after it, and what the append cost."""

    context: CompressOutcome  # the context as it stands now (its timings: this append's)
    encoded_tokens: int  # tokens the lower model encoded: the stored last chunk's again, and the new ones
    kept_chunks: int  # chunks kept as stored
    encoded_chunks: int
    bytes_written: int  # to the store: the new manifest, the index part and the new nodes only


@dataclass(frozen=True)
class GenerateTimings:
    """Seconds per phase of one answer; time_to_first_token_s runs from the request's start."""

    context_open_s: float = 0.0  # manifest, retrieval keys and token ids read and verified
    evidence_s: float = 0.0  # passage index (built, or found in the cache) and ranking
    selection_s: float = 0.0  # the nodes chosen per chunk
    context_load_s: float = 0.0  # the chosen nodes read, verified and decoded
    prepare_s: float = 0.0  # selection, load and the injection's layout together
    prefill_s: float = 0.0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0  # from the first token to the last

    def plus(self, other: GenerateTimings) -> GenerateTimings:
        """Phase by phase sum: each layer times its own phases and leaves the others at zero."""
        return GenerateTimings(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def context_read_s(self) -> float:
        """Store reads of the request: opening the context and loading its nodes."""
        return self.context_open_s + self.context_load_s


@dataclass(frozen=True)
class ContextRead:
    """What answering read of a stored context."""

    tokens: int  # document tokens the context holds
    chunks: int
    bytes_read: int  # from the store; nodes found in the decoded cache cost nothing
    cached_nodes: int  # selected nodes taken from the decoded cache instead of the store


@dataclass(frozen=True)
class TokenDelta:
    """Text that became final; token_id is None when only held-back text is released."""

    token_id: int | None
    text: str


@dataclass(frozen=True)
class Passage:
    """One excerpt given to the decoder: where it is in the document, its text and its score.

    Character offsets index the document's text as its tokens decode (for the byte-level
    tokenizers of the supported models, the text that was compressed).
    """

    token_start: int
    token_end: int
    char_start: int
    char_end: int
    text: str
    score: float
    context_id: str | None = None  # the context (document) it was cut from; None: a bare tree

    @property
    def n_tokens(self) -> int:
        return self.token_end - self.token_start

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"context_id": self.context_id} if self.context_id is not None else {}),
            "token_start": self.token_start,
            "token_end": self.token_end,
            "char_start": self.char_start,
            "char_end": self.char_end,
            "score": round(self.score, 4),
            "text": self.text,
        }


@dataclass(frozen=True)
class Citation:
    """A run of the answer that the document states word for word (citations.py).

    answer_start/answer_end: character offsets in the answer's text; char_start/char_end: in the
    text of the document context_id names, as Passage offsets are; evidence_index: the passage of
    Finished.evidence where the excerpt that holds it starts (adjacent passages are one excerpt in
    the window; None: the document holds it outside the window's excerpts).
    """

    answer_start: int
    answer_end: int
    char_start: int
    char_end: int
    text: str
    evidence_index: int | None
    context_id: str | None = None  # the context (document) that states it; None: a bare tree

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"context_id": self.context_id} if self.context_id is not None else {}),
            "answer_start": self.answer_start,
            "answer_end": self.answer_end,
            "char_start": self.char_start,
            "char_end": self.char_end,
            "evidence_index": self.evidence_index,
            "text": self.text,
        }


@dataclass(frozen=True)
class Finished:
    """The last event of an answer: why it ended and everything measured on the way."""

    reason: str  # "stop" (stop string), "eos", "length", or "repetition" (the loop guard)
    text: str
    prompt_tokens: int
    completion_tokens: int
    timings: GenerateTimings = field(default_factory=GenerateTimings)
    evidence: tuple[Passage, ...] = ()  # the excerpts the window held, in document order
    context: ContextRead | None = None  # None: the question was asked without a document
    citations: tuple[Citation, ...] = ()  # the runs of the answer the document states word for word

    @property
    def evidence_tokens(self) -> int:
        return sum(p.n_tokens for p in self.evidence)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token (None when fewer than two tokens were made)."""
        decode = self.timings.decode_s
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else None


def run_to_end(events: Iterator[TokenDelta | Finished]) -> Finished:
    """Decode to the end without streaming; the Finished (its text is the whole answer)."""
    return next(e for e in events if isinstance(e, Finished))
