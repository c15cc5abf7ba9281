"""Sampling parameters, their validation, and next-token selection."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from common.errors import InvalidInput

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_K = 1_000_000
MAX_REPETITION_PENALTY = 10.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; 0 / 1.0 disable top_k / top_p."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def validate(self, max_new_tokens_limit: int) -> None:
        """Raise InvalidInput naming the parameter, its limit and the value received."""

        def bad(name: str, rule: str, value: object) -> InvalidInput:
            return InvalidInput(f"{name} must be {rule}, got {value!r}")

        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise bad("max_new_tokens", f"an integer in [1, {max_new_tokens_limit}]", self.max_new_tokens)
        if not math.isfinite(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "finite and in [0, 100]", self.temperature)
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"in [0, {MAX_TOP_K}]", self.top_k)
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]", self.top_p)
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p < 1.0:
            raise bad("min_p", "in [0, 1)", self.min_p)
        if not math.isfinite(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty", f"in (0, {MAX_REPETITION_PENALTY}]", self.repetition_penalty)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "in [0, 2**63)", self.seed)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} strings", f"{len(self.stop)} strings")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise bad("each stop string", f"1 to {MAX_STOP_CHARS} characters", s[:40])


class Sampler:
    """Turns logits into the next token; owns the request's seeded random generator."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        """logits [V] of the last position; seen: token ids of prompt and output so far."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 and seen.numel():
            prev = logits[seen]
            penalised = torch.where(prev > 0, prev / p.repetition_penalty, prev * p.repetition_penalty)
            logits = logits.scatter(0, seen, penalised)
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            probs = probs / probs.sum()  # top-p below measures mass of what min-p kept
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            outside = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator))
