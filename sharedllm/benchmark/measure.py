"""What every benchmark method answers, and the one sequence that measures them all.

`store(tokens)` builds what later questions read (SharedLLM: the compressed context in a
store; full attention: the document's KV cache; StreamingLLM: its bounded sink cache), and
`ask(question)` answers from it, leaving it as it was. First-question time to first token is
store + ask; the repeat question is a second ask on the same stored context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from sharedllm.benchmark.workload import QUESTIONS

LOCAL_METHODS: tuple[str, ...] = ("sharedllm", "full", "streaming")
GRPC_METHOD = "grpc"  # SharedLLM through the gRPC services and Redis, against embedded `sharedllm`
WARM_UP_TOKENS = 256


@dataclass(frozen=True)
class Stored:
    seconds: float
    stored_bytes: int
    details: dict[str, float] = field(default_factory=dict)  # parts of `seconds`, by name


@dataclass(frozen=True)
class Answer:
    ttft_s: float  # from the question's arrival to its first token
    decode_s: float  # from the first token to the last
    tokens: int  # tokens generated (an end-of-sequence token is not counted)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token; None when fewer than two tokens came."""
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else None


class Method(Protocol):
    def store(self, tokens: list[int]) -> Stored: ...

    def ask(self, question: str) -> Answer: ...


def measure(method: Method, tokens: list[int]) -> dict[str, Any]:
    """Store the document, then ask the first and the repeat question; the cell's metrics."""
    stored = method.store(tokens)
    first = method.ask(QUESTIONS[0])
    repeat = method.ask(QUESTIONS[1])
    return {
        "compress_s": stored.seconds,
        **stored.details,
        "first_ttft_s": stored.seconds + first.ttft_s,
        "repeat_ttft_s": repeat.ttft_s,
        "decode_tokens_per_s": first.tokens_per_s,
        "decoded_tokens": first.tokens,
        "stored_bytes": stored.stored_bytes,
    }


def warm_up(method: Method, tokens: list[int]) -> None:
    """Run every operation once on a short prefix, so one-time costs (lazy initialisation, first
    allocations, kernel selection, a channel's connection) stay out of the measurement."""
    method.store(tokens[:WARM_UP_TOKENS])
    method.ask(QUESTIONS[0])
