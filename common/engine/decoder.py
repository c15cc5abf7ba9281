"""The upper model: query-aware node selection and injection in layers 0..M-1 (decoding: generation.py)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from types import ModuleType

import torch

from sharedllm.common.engine.adapter import InjectionAdapter
from sharedllm.common.engine.generation import decode
from sharedllm.common.engine.grounding import GroundedAnswer
from sharedllm.common.engine.llama import KVCache, LlamaBody, apply_rope, rms_normalise
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import Finished, GenerateTimings, TokenDelta
from sharedllm.common.engine.retrieval import select_nodes
from sharedllm.common.engine.tree import ContextSource
from sharedllm.common.errors import IncompatibleContext
from sharedllm.common.kernels import decode_attention, gather_injection
from sharedllm.common.kernels.dispatch import requested_backend

# A prompt's queries attend, and read the injection, in blocks that end where positions reach a
# multiple of this, however the prompt is cut into steps (Decoder.step_rows); the scheduler cuts
# prompts only there. The CPU's attention kernel splits its queries into tiles by their number,
# so a query read in a piece of another length can round differently in the last bit; with fixed
# blocks every answer goes through the same arithmetic alone, batched or in pieces
# (bench/packed_linear.py: pieces of a 1,200-token prompt mostly differ from the whole).
ATTENTION_BLOCK = 128


def attention_blocks(start: int, length: int, block: int) -> list[tuple[int, int]]:
    """[lo, hi) offsets, within a piece of `length` tokens at positions start.., of its blocks."""
    cuts = range(start - start % block + block, start + length, block)
    return [(lo - start, hi - start) for lo, hi in pairwise([start, *cuts, start + length])]


@dataclass(frozen=True)
class Injection:
    """What the cross-attention blocks read for one request, fixed for every step.

    keys/values: [M, n_kv, E, Dh] (keys already carry chunk-level RoPE); mask: [E];
    n_chunks: the RoPE position of the queries; shielded: position spans [start, end) that read
    no injection (with excerpts in the window, everything but the question: evidence.shielded_spans).
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    n_chunks: int
    shielded: tuple[tuple[int, int], ...] = ()


def uninjected_prefix(injection: Injection | None, length: int) -> int:
    """How many leading positions of a prompt of `length` tokens read no injection (see _hook)."""
    if injection is None:
        return length
    return min(length, max((end for start, end in injection.shielded if start == 0), default=0))


class StepAttention:
    """The self-attention of one model step's blocks (Decoder.step_rows), set up once per step so
    that a layer costs few operations: each block of a prompt row by row over its row's cache up
    to its own last token, and every block of one query (the decoding rows) in one call of the
    compiled kernel where there is one (kernels/decode_attention.py)."""

    def __init__(self, body: LlamaBody, kernel: ModuleType | None) -> None:
        self.body = body
        self.kernel = kernel
        self.queries: list[int] = []  # each block's number of queries, in token order
        self.reads: list[tuple | None] = []  # each block's cache (keys, values by layer; past), None: the kernel's
        self.single: list[int] = []  # which blocks the kernel takes
        self.single_tokens: list[int] = []  # and their tokens' places in the step
        self.single_keys: list[torch.Tensor] = []  # their rows' whole caches
        self.single_values: list[torch.Tensor] = []
        self.single_lengths: list[int] = []  # and how many positions of them each reads

    def add(self, cache: KVCache, start: int, end: int, token: int) -> None:
        """A block of queries at cache positions [start, end), the first at `token` in the step."""
        if self.kernel is not None and end - start == 1:
            self.single.append(len(self.queries))
            self.single_tokens.append(token)
            self.single_keys.append(cache.keys)
            self.single_values.append(cache.values)
            self.single_lengths.append(end)
            self.reads.append(None)
        else:
            self.reads.append((cache.keys[:, :, :, :end].unbind(0), cache.values[:, :, :, :end].unbind(0), start))
        self.queries.append(end - start)

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The heads' outputs [1, T, H * Dh] of layer `layer` for the step's queries q [1, H, T, Dh]."""
        tokens = q.shape[2]
        if len(self.single) == len(self.queries):  # decoding rows only: the kernel does all of it
            return self._single_heads(layer, q[0].transpose(0, 1)).view(1, tokens, -1)
        blocks = list(q.split(self.queries, dim=2))
        if self.single:
            heads = self._single_heads(layer, q[0, :, self.single_tokens].transpose(0, 1))
            for index, out in zip(self.single, heads.unsqueeze(2).unsqueeze(1).unbind(0), strict=True):
                blocks[index] = out
        for index, read in enumerate(self.reads):
            if read is not None:
                keys, values, past = read
                blocks[index] = self.body.attention_heads(layer, blocks[index], keys[layer], values[layer], past)
        return torch.cat(blocks, dim=2).transpose(1, 2).reshape(1, tokens, -1)

    def _single_heads(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """The kernel's heads [R, H, Dh] for the one-query blocks' queries rows [R, H, Dh]."""
        scale = self.body.layers[layer].self_attn.scaling
        keys, values, lengths = self.single_keys, self.single_values, self.single_lengths
        return self.kernel.decode_attention(rows.contiguous(), keys, values, lengths, layer, scale)


class Decoder:
    def __init__(self, body: LlamaBody, adapter: InjectionAdapter, eos_ids: set[int]) -> None:
        self.body = body
        self.adapter = adapter
        self.eos_ids = eos_ids
        self.block = ATTENTION_BLOCK  # fixed while answers are in flight: it is part of their arithmetic

    @torch.inference_mode()
    def query_vector(self, query_ids: list[int]) -> torch.Tensor:
        """Layer-0 state at the last token of the question, normalised like the retrieval keys.

        Only the question's own tokens are used, never tokens after it, so training cannot
        leak the answer into retrieval (bug 5 of the reference code).
        """
        ids = torch.tensor([query_ids], dtype=torch.long, device=self.body.device)
        positions = torch.arange(len(query_ids), device=ids.device).unsqueeze(0)
        h = self.body.forward_layers(self.body.embed(ids), positions, range(0, 1))
        return rms_normalise(h[0, -1], self.body.rms_eps)

    def prepare(
        self, source: ContextSource, query: torch.Tensor | None, bias: torch.Tensor | None = None
    ) -> tuple[Injection, GenerateTimings]:
        """Select nodes per chunk (bias: [B, N] added to the query's similarities), fetch only
        those, and lay them out for cross-attention."""
        cfg = self.adapter.config
        if source.config != cfg:
            raise IncompatibleContext(f"context built with {source.config}, the adapter expects {cfg}")
        t0 = time.perf_counter()
        selection = select_nodes(source.retrieval_keys, query, cfg.depth, bias)
        t1 = time.perf_counter()
        nodes = source.fetch(selection)
        t2 = time.perf_counter()
        device = self.body.device
        n_chunks = selection.shape[0]
        cos = sin = None
        if cfg.positions == "chunk":
            cos, sin = self.body.rope(torch.arange(n_chunks, device=device).unsqueeze(0))
            cos, sin = cos[0], sin[0]
        keys, values, mask = gather_injection(
            nodes.keys.to(device=device, dtype=self.body.dtype),
            nodes.values.to(device=device, dtype=self.body.dtype),
            nodes.counts.to(device),
            torch.arange(nodes.counts.shape[0], device=device),
            nodes.chunk_of_row.to(device),
            cos,
            sin,
        )
        injection = Injection(keys, values, mask, n_chunks)
        return injection, GenerateTimings(selection_s=t1 - t0, context_load_s=t2 - t1)

    def _hook(self, injection: Injection | None, start: int, length: int):
        if injection is None:
            return None
        reads = None  # [1, L, 1]: 0 where a position reads no injection
        for span in injection.shielded:
            low, high = (min(max(0, p - start), length) for p in span)
            if (low, high) == (0, length):
                return None  # every position is shielded (a decode step of the answer): skip the blocks
            if low < high:
                if reads is None:
                    reads = torch.ones(1, length, 1, device=self.body.device, dtype=self.body.dtype)
                reads[:, low:high] = 0
        m = self.adapter.config.n_layers
        rope = None
        if self.adapter.config.positions == "chunk":
            rope = self.body.rope(torch.full((1, length), injection.n_chunks, device=self.body.device))

        def inject(i: int, h: torch.Tensor) -> torch.Tensor | None:
            if i >= m:
                return None
            block = self.adapter.blocks[i]
            out = block(h, injection.keys[i].unsqueeze(0), injection.values[i].unsqueeze(0), injection.mask, rope)
            return out if reads is None else out * reads

        return inject

    def forward(self, ids: torch.Tensor, start: int, cache, injection: Injection | None) -> torch.Tensor:
        """Residual stream after the last layer (before the final norm) for ids [1, L] at positions start.."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        h = self.body.forward_layers(
            self.body.embed(ids),
            positions,
            range(self.body.n_layers),
            cache,
            self._hook(injection, start, ids.shape[1]),
        )
        if cache is not None:
            cache.advance(ids.shape[1])
        return h

    @functools.cached_property
    def decode_kernel(self) -> ModuleType | None:
        """The compiled CPU attention for decoding rows (kernels/decode_attention.py) where it
        applies and builds, else None. Resolved at the first step and fixed after, since it is
        part of every answer's arithmetic; `SHAREDLLM_KERNELS=torch` keeps torch's attention."""
        body = self.body
        if requested_backend() == "torch":
            return None
        if not decode_attention.supports(body.device, body.dtype, body.n_heads, body.n_kv, body.head_dim):
            return None
        return decode_attention.load()

    def step_rows(
        self, pieces: Sequence[Sequence[int]], caches: Sequence[KVCache], injections: Sequence[Injection | None]
    ) -> torch.Tensor:
        """One model step of several answers at once; the logits after each piece's last token [B, vocab].

        Row b feeds pieces[b] (one token while it decodes, a piece of its prompt while it reads it)
        at the next positions of caches[b], reading injections[b]. The pieces are packed into one
        sequence for the projections, MLPs and the head, so the weights are read once per step for
        every row (what batching buys). Attention and the injection's cross-attention run block by
        block (ATTENTION_BLOCK) over each row's own cache and tree: row by row for blocks of a
        prompt, and for all blocks of one query (the decoding rows) in one call of the compiled
        kernel where there is one (decode_kernel). On the CPU the packed projections give a row the
        same bits whatever the other rows (kernels/packed_linear.py), and so does the kernel, so a
        row's result is the one it gets alone.
        """
        body = self.body
        device = body.device
        starts = [cache.length for cache in caches]
        lengths = [len(piece) for piece in pieces]
        bounds = [0, *accumulate(lengths)]
        ids = torch.tensor([t for piece in pieces for t in piece], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lengths, strict=True)])
        h = body.embed(ids).unsqueeze(0)  # [1, T, hidden]: every row's tokens, one after another
        cos, sin = body.rope(positions.unsqueeze(0))
        # Views made once per step, so a layer costs few operations per row: where each row's new
        # keys and values go, what each attention block reads, and the injection's readers.
        new_keys, new_values, reading = [], [], []
        attention = StepAttention(body, self.decode_kernel)
        for lo, start, cache, injection, n in zip(bounds[:-1], starts, caches, injections, lengths, strict=True):
            if start + n > cache.capacity:
                raise ValueError(f"KV cache overflow: {start + n} > capacity {cache.capacity}")
            new_keys.append(cache.keys[:, 0, :, start : start + n].unbind(0))
            new_values.append(cache.values[:, 0, :, start : start + n].unbind(0))
            for a, b in attention_blocks(start, n, self.block):
                attention.add(cache, start + a, start + b, lo + a)  # a block sees the cache up to its last token
                hook = self._hook(injection, start + a, b - a)
                if hook is not None:
                    reading.append((lo + a, lo + b, hook))
        for i in range(body.n_layers):
            q, k, v = body.project(i, h)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            torch._foreach_copy_([row[i] for row in new_keys], k[0].split(lengths, dim=1))
            torch._foreach_copy_([row[i] for row in new_values], v[0].split(lengths, dim=1))
            attended = attention(i, q)
            h = h + body.layers[i].self_attn.o_proj(attended)
            for lo, hi, hook in reading:
                extra = hook(i, h[:, lo:hi])
                if extra is not None:
                    h[:, lo:hi] += extra
            h = h + body.mlp(i, h)
        for cache, n in zip(caches, lengths, strict=True):
            cache.advance(n)
        return body.logits(h[0, [hi - 1 for hi in bounds[1:]]])

    def generate(
        self,
        prompt_ids: list[int],
        injection: Injection | None,
        params: SamplingParams,
        decode_text: Callable[[list[int]], str],
        grounding: GroundedAnswer | None = None,
    ) -> Iterator[TokenDelta | Finished]:
        """Prefill the prompt with the injection, then decode (generation.decode); a Finished comes
        last. One answer at a time, through the same step as a batch of one (scheduler.py batches
        the steps of several answers), so an answer never depends on which path ran it."""
        cache = self.body.new_cache(len(prompt_ids) + params.max_new_tokens)

        def step(ids: list[int]) -> torch.Tensor:
            return self.step_rows([ids], [cache], [injection])[0]

        return decode(step, prompt_ids, params, self.eos_ids, decode_text, self.body.device, grounding)
