"""Next-token selection for the parameters a request carries (params.SamplingParams)."""

from __future__ import annotations

import torch

from sharedllm.common.engine.grounding import GroundedAnswer
from sharedllm.common.engine.params import SamplingParams

SAMPLED_CANDIDATES = 64  # with grounding and no top_k, sampling picks among this many allowed tokens


class Sampler:
    """Turns logits into the next token; owns the request's seeded random generator."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, seen: torch.Tensor, grounding: GroundedAnswer | None = None, final: bool = False
    ) -> int:
        """logits [V] of the last position; seen: token ids of prompt and output so far; grounding:
        only tokens it allows are picked (final: this is the answer's last token)."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 and seen.numel():
            prev = logits[seen]
            penalised = torch.where(prev > 0, prev / p.repetition_penalty, prev * p.repetition_penalty)
            logits = logits.scatter(0, seen, penalised)
        if grounding is not None:
            keep = 1 if p.temperature == 0 else min(p.top_k or SAMPLED_CANDIDATES, SAMPLED_CANDIDATES)
            logits = grounding.restrict(logits, keep, final)
        if p.temperature == 0:
            return int(logits.argmax())
        # Shifted so the best logit is 0 before scaling, in float64 (a temperature of 5e-324 is 0 in
        # float32): a tiny temperature then sends the others to -inf (probability 0) instead of every
        # logit to +-inf (NaN probabilities), and sampling becomes greedy.
        logits = (logits.double() - logits.max()) / p.temperature
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
