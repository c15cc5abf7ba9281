"""Compression: document tokens -> chunks -> lower model -> pooled context trees.

The lower model is the base model's embeddings and layers 0..M-1, reached through the same
`LlamaBody` the decoder uses, so it can never hold other (or random) weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sharedllm.common.config import TreeConfig, node_count, node_index
from sharedllm.common.engine.llama import LayerOutput, LlamaBody, rms_normalise
from sharedllm.common.engine.tree import ContextTree
from sharedllm.common.kernels import pool_nodes

ProgressFn = Callable[[int, int], None]


def node_spans(length: int, depth: int, noise: torch.Generator | None = None) -> torch.Tensor:
    """Spans [N, 2] (start, end) of every node of levels 1..depth of a chunk of `length` tokens.

    Each node splits its parent at the middle; with `noise` (training only) the split point
    moves by a Gaussian offset with sigma = child length / 5, so the model does not overfit
    exact halves. Children always partition their parent; spans may be empty for tiny chunks.
    """
    spans = torch.zeros(node_count(depth), 2, dtype=torch.long)
    parents = [(0, length)]
    for level in range(1, depth + 1):
        children = []
        for start, end in parents:
            mid = start + (end - start) // 2
            if noise is not None and end - start >= 2:
                sigma = (end - start) / 2 / 5
                offset = round(float(torch.randn((), generator=noise)) * sigma)
                mid = min(max(mid + offset, start + 1), end - 1)
            children += [(start, mid), (mid, end)]
        base = node_index(level, 0)
        spans[base : base + len(children)] = torch.tensor(children, dtype=torch.long)
        parents = children
    return spans


def pooling_plan(spans: torch.Tensor, pool_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot blocks for node spans [..., 2]: start/end [..., P] and counts [...].

    A node of n tokens keeps E = min(n, P) entries; slot b covers tokens
    [s + floor(b n / E), s + floor((b + 1) n / E)). Slots at or past E are empty.
    """
    s, e = spans[..., 0:1], spans[..., 1:2]
    n = e - s
    count = n.clamp(max=pool_size)
    slot = torch.arange(pool_size, device=spans.device)
    safe = count.clamp(min=1)
    start = s + (slot * n) // safe
    end = s + ((slot + 1) * n) // safe
    used = slot < count
    start = torch.where(used, start, torch.zeros_like(start))
    end = torch.where(used, end, torch.zeros_like(end))
    return start, end, count.squeeze(-1).to(torch.int32)


class Compressor:
    """Builds the context tree of every chunk of a document with the bottom M layers."""

    def __init__(self, body: LlamaBody, config: TreeConfig, batch_chunks: int = 4) -> None:
        if config.n_layers > body.n_layers:
            raise ValueError(f"n_layers={config.n_layers} exceeds the model's {body.n_layers} layers")
        self.body = body
        self.config = config
        self.batch_chunks = max(1, batch_chunks)

    def chunk(self, token_ids: Sequence[int]) -> list[list[int]]:
        """Cut into chunks of C tokens; the last chunk keeps whatever is left (never dropped)."""
        size = self.config.chunk_size
        return [list(token_ids[i : i + size]) for i in range(0, len(token_ids), size)]

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower-model pass over right-padded sequences [S, L].

        Returns keys and values stacked as [2M, S, n_kv, L, Dh] (keys first) and the hidden
        states after layer 0 [S, L, hidden]. Causal attention means real tokens never see
        the right padding, so no padding mask is needed (or can be wrong).
        """
        body = self.body
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        record: list[LayerOutput] = []
        first = body.forward_layers(body.embed(ids), positions, range(0, 1), record=record)
        body.forward_layers(first, positions, range(1, self.config.n_layers), record=record)
        kv = torch.stack([r.keys for r in record] + [r.values for r in record])
        return kv, first

    @torch.no_grad()  # not inference_mode: training reads trees inside autograd
    def compress(
        self,
        token_ids: Sequence[int],
        progress: ProgressFn | None = None,
        split_noise: torch.Generator | None = None,
    ) -> ContextTree:
        if len(token_ids) == 0:
            raise ValueError("cannot compress an empty document")
        chunks = self.chunk(token_ids)
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for first in range(0, len(chunks), self.batch_chunks):
            batch = chunks[first : first + self.batch_chunks]
            parts.append(self._compress_batch(batch, split_noise))
            if progress is not None:
                progress(min(first + self.batch_chunks, len(chunks)), len(chunks))
        kv = torch.cat([p[0] for p in parts], dim=1)
        m = self.config.n_layers
        return ContextTree(
            config=self.config,
            chunk_lengths=tuple(len(c) for c in chunks),
            keys=kv[:m].contiguous(),
            values=kv[m:].contiguous(),
            counts=torch.cat([p[1] for p in parts]),
            retrieval_keys=torch.cat([p[2] for p in parts]),
            token_ids=torch.tensor(list(token_ids), dtype=torch.int32),
        )

    def _padded(self, seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids.to(self.body.device)

    def _compress_batch(
        self, chunks: list[list[int]], split_noise: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled kv [2M, b, N, P, kv, Dh], counts [b, N] and retrieval keys [b, N, hidden]."""
        cfg = self.config
        spans = torch.stack([node_spans(len(c), cfg.depth, split_noise) for c in chunks])  # [b, N, 2]
        if cfg.encoding == "single_pass":
            return self._pool(self._padded(chunks), spans, torch.arange(len(chunks)).unsqueeze(1), spans)
        # per_node: each level's nodes are their own sequences, positions restarting at 0.
        pooled, counts, rkeys = [], [], []
        for level in range(1, cfg.depth + 1):
            base, width = node_index(level, 0), 2**level
            level_spans = spans[:, base : base + width]  # [b, w, 2]
            seqs = [chunk[s:e] or [0] for chunk, row in zip(chunks, level_spans, strict=True) for s, e in row.tolist()]
            local = level_spans - level_spans[..., :1]  # spans inside their own sequence
            seq_index = torch.arange(len(seqs)).view(len(chunks), width)
            part = self._pool(self._padded(seqs), local, seq_index, level_spans)
            pooled.append(part[0])
            counts.append(part[1])
            rkeys.append(part[2])
        return torch.cat(pooled, dim=2), torch.cat(counts, dim=1), torch.cat(rkeys, dim=1)

    def _pool(
        self, ids: torch.Tensor, local_spans: torch.Tensor, seq_index: torch.Tensor, spans: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode sequences and pool the nodes `local_spans` [b, n, 2] cut from `seq_index` [b, n]."""
        kv, first = self.encode(ids)
        device = kv.device
        seq = seq_index.expand(local_spans.shape[:2]).to(device)
        local_spans = local_spans.to(device)
        start, end, counts = pooling_plan(local_spans, self.config.pool_size)
        pooled = pool_nodes(kv, seq, start, end, self.config.pooling)
        last = (local_spans[..., 1] - 1).clamp(min=0)
        rkeys = rms_normalise(first[seq, last], self.body.rms_eps)
        empty = (spans[..., 1] <= spans[..., 0]).to(device)
        rkeys = torch.where(empty.unsqueeze(-1), torch.zeros_like(rkeys), rkeys)
        return pooled, counts.cpu(), rkeys.float().cpu()
