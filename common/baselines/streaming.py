"""StreamingLLM (attention sinks + a recent window), the streaming baseline of docs/evaluation.md.

The cache keeps the keys/values of the first `sinks` tokens and of the most recent `recent`
tokens and evicts everything in between. Positions are positions inside the cache, not in the
document: keys are stored before the rotary embedding and rotated by their slot index at
every attention, so no position ever reaches `sinks + recent` (which must fit the model's
window) however long the stream runs, and no key is rotated twice (re-rotating stored keys
at each eviction would accumulate rounding error, badly so in bf16).

The transformers library no longer ships a sink cache, and the engine's `LlamaBody.attention`
rotates keys before caching them, so the attention here is its own, over the same modules.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence

import torch

from sharedllm.common.engine.generation import decode
from sharedllm.common.engine.llama import LlamaBody, apply_rope
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import Finished, TokenDelta
from sharedllm.common.errors import InvalidInput

DEFAULT_SINKS = 4


class SinkCache:
    """Pre-RoPE keys and values of the sink tokens and the most recent ones, one slab per layer.

    `token_index` records which token of the stream each slot holds, so eviction can be
    checked and reported (it plays no part in attention).
    """

    def __init__(self, body: LlamaBody, sinks: int, recent: int) -> None:
        self.sinks = sinks
        self.recent = recent
        self.capacity = sinks + recent
        shape = (body.n_layers, 1, body.n_kv, self.capacity, body.head_dim)
        self.keys = torch.zeros(shape, dtype=body.dtype, device=body.device)
        self.values = torch.zeros(shape, dtype=body.dtype, device=body.device)
        self.token_index = torch.zeros(self.capacity, dtype=torch.long)
        self.length = 0  # slots in use
        self.seen = 0  # tokens streamed so far

    def make_room(self, incoming: int) -> None:
        """Evict the oldest non-sink entries so that `incoming` more tokens fit."""
        if incoming > self.recent:
            raise ValueError(f"a piece of {incoming} tokens exceeds the recent window of {self.recent}")
        excess = self.length + incoming - self.capacity
        if excess <= 0:
            return
        keep = slice(self.sinks + excess, self.length)
        into = slice(self.sinks, self.length - excess)
        self.keys[:, :, :, into] = self.keys[:, :, :, keep].clone()
        self.values[:, :, :, into] = self.values[:, :, :, keep].clone()
        self.token_index[into] = self.token_index[keep].clone()
        self.length -= excess

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a piece's pre-RoPE keys/values [1, n_kv, p, Dh]; return every slot in use, the piece included."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Commit the piece that every layer has extended the cache with."""
        self.token_index[self.length : self.length + n] = torch.arange(self.seen, self.seen + n)
        self.length += n
        self.seen += n

    @property
    def cached_tokens(self) -> list[int]:
        """Stream indices of the tokens held, in slot order."""
        return self.token_index[: self.length].tolist()


class StreamingLLM:
    """The base model reading through a SinkCache: perplexity scoring and greedy decoding.

    Long inputs go in pieces of at most `piece` tokens (default: half the recent window), with
    eviction before each piece, so every token of a piece still sees at least `recent - piece`
    earlier tokens besides the sinks; scored and generated tokens go one at a time, each
    seeing the sinks and the `recent - 1` tokens before it.
    """

    def __init__(self, body: LlamaBody, recent: int, sinks: int = DEFAULT_SINKS, piece: int | None = None) -> None:
        if recent < 1 or sinks < 0:
            raise InvalidInput(f"streaming needs recent >= 1 and sinks >= 0, got recent={recent}, sinks={sinks}")
        if sinks + recent > body.window:
            raise InvalidInput(
                f"sinks + recent ({sinks + recent}) exceeds the model's window of {body.window} positions"
            )
        self.body = body
        self.sinks = sinks
        self.recent = recent
        self.piece = piece or max(1, recent // 2)
        if not 1 <= self.piece <= recent:
            raise InvalidInput(f"piece must be in [1, {recent}], got {self.piece}")
        slots = torch.arange(sinks + recent, device=body.device).unsqueeze(0)
        self.cos, self.sin = body.rope(slots)  # one table for every slot, sliced per piece

    def new_cache(self) -> SinkCache:
        return SinkCache(self.body, self.sinks, self.recent)

    def _attention(self, index: int, h: torch.Tensor, cache: SinkCache) -> torch.Tensor:
        """Self-attention of layer `index` for a piece h [1, p, hidden] over the cache plus the piece.

        Keys are cached before RoPE and rotated by their cache slot here, so positions are
        positions in the cache, not in the document.
        """
        q, k, v = self.body.project(index, h)
        past = cache.length
        keys, values = cache.extend(index, k, v)
        n = past + h.shape[1]
        keys = apply_rope(keys, self.cos[:, :n], self.sin[:, :n])
        q = apply_rope(q, self.cos[:, past:n], self.sin[:, past:n])
        return self.body.attend(index, q, keys, values, past)

    def _forward_piece(self, cache: SinkCache, ids: Sequence[int]) -> torch.Tensor:
        cache.make_room(len(ids))
        h = self.body.embed(torch.tensor([list(ids)], dtype=torch.long, device=self.body.device))
        for i in range(self.body.n_layers):
            h = h + self._attention(i, h, cache)
            h = h + self.body.mlp(i, h)
        cache.advance(len(ids))
        return h

    @torch.inference_mode()
    def feed(self, cache: SinkCache, ids: Sequence[int]) -> torch.Tensor:
        """Stream `ids` through the cache in pieces; the last token's hidden state [hidden] (before the final norm)."""
        if not ids:
            raise ValueError("nothing to feed")
        for start in range(0, len(ids), self.piece):
            h = self._forward_piece(cache, ids[start : start + self.piece])
        return h[0, -1]

    @torch.inference_mode()
    def stream_logits(self, token_ids: Sequence[int], scored_from: int) -> Iterator[torch.Tensor]:
        """For each t >= scored_from, the logits [V] (float) predicting token_ids[t] from the stream before it."""
        if not 1 <= scored_from <= len(token_ids):
            raise ValueError(f"scored_from must be in [1, {len(token_ids)}], got {scored_from}")
        cache = self.new_cache()
        h = self.feed(cache, token_ids[:scored_from])
        for t in range(scored_from, len(token_ids)):
            yield self.body.logits(h).float()
            if t + 1 < len(token_ids):
                h = self.feed(cache, token_ids[t : t + 1])

    def score(self, token_ids: Sequence[int], scored_from: int) -> tuple[float, int]:
        """Summed next-token NLL of token_ids[scored_from:], and how many tokens were scored."""
        total = 0.0
        for t, logits in enumerate(self.stream_logits(token_ids, scored_from), start=scored_from):
            total -= float(torch.log_softmax(logits, -1)[token_ids[t]])
        return total, len(token_ids) - scored_from

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_ids: Collection[int],
        decode_text: Callable[[list[int]], str],
    ) -> Iterator[TokenDelta | Finished]:
        """Stream the prompt through a fresh sink cache, then decode (generation.decode)."""
        cache = self.new_cache()

        def step(ids: list[int]) -> torch.Tensor:
            return self.body.logits(self.feed(cache, ids))

        return decode(step, list(prompt_ids), params, eos_ids, decode_text, self.body.device)
