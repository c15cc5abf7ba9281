"""The context tree: what compression produces and what the decoder reads.

Layout (B chunks, N = 2**(D+1) - 2 nodes per chunk, levels 1..D, node index of level l
position p is `2**l - 2 + p`):

    keys, values    [M, B, N, P, n_kv_heads, head_dim]  pooled entries per lower layer;
                    keys carry the token-level RoPE of their encoding, no chunk rotation
    counts          [B, N] int32                          valid entries per node (<= P)
    retrieval_keys  [B, N, hidden] float32                RMS-normalised layer-0 states
    token_ids       [T] int32                             the document's tokens (T = sum of chunk
                                                          lengths): evidence passages are cut from them

Slots at or beyond `counts` are zero and masked; a node shorter than P keeps every entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from sharedllm.common.config import TreeConfig


@dataclass(frozen=True)
class SelectedNodes:
    """The entries one question reads, gathered in document order.

    keys/values: [M, S, P, n_kv_heads, head_dim] for S = B * (D + 1) selected nodes,
    counts: [S] valid entries per node, chunk_of_row: [S] the chunk each node belongs to.
    """

    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    chunk_of_row: torch.Tensor


class ContextSource(Protocol):
    """What the decoder needs from a compressed context, wherever it is stored.

    Retrieval keys are read first; `fetch` then reads only the nodes a question selected,
    so a store can avoid transferring the ~70% of the tree a question never uses.
    """

    @property
    def config(self) -> TreeConfig: ...

    @property
    def chunk_lengths(self) -> tuple[int, ...]: ...

    @property
    def retrieval_keys(self) -> torch.Tensor: ...

    @property
    def token_ids(self) -> torch.Tensor: ...

    def fetch(self, selection: torch.Tensor) -> SelectedNodes:
        """Read the nodes `selection[b, k]` (node index within chunk b), in that order."""
        ...


@dataclass
class ContextTree:
    """A whole compressed document held in memory (see module docstring for the layout)."""

    config: TreeConfig
    chunk_lengths: tuple[int, ...]
    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    retrieval_keys: torch.Tensor
    token_ids: torch.Tensor

    def __post_init__(self) -> None:
        m, b, n, p = self.config.n_layers, len(self.chunk_lengths), self.config.nodes_per_chunk, self.config.pool_size
        expected = (m, b, n, p)
        if tuple(self.keys.shape[:4]) != expected or self.keys.shape != self.values.shape:
            raise ValueError(
                f"tree keys/values must be [M, B, N, P, kv, hd] with M,B,N,P={expected}; "
                f"got {tuple(self.keys.shape)} and {tuple(self.values.shape)}"
            )
        if tuple(self.counts.shape) != (b, n):
            raise ValueError(f"counts must be [{b}, {n}], got {tuple(self.counts.shape)}")
        if tuple(self.retrieval_keys.shape[:2]) != (b, n):
            raise ValueError(f"retrieval_keys must be [{b}, {n}, hidden], got {tuple(self.retrieval_keys.shape)}")
        if tuple(self.token_ids.shape) != (self.n_tokens,) or self.token_ids.dtype != torch.int32:
            raise ValueError(
                f"token_ids must be int32 [{self.n_tokens}], got {self.token_ids.dtype} {tuple(self.token_ids.shape)}"
            )

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_lengths)

    @property
    def n_tokens(self) -> int:
        return sum(self.chunk_lengths)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the tree holds (what a store keeps, before framing)."""
        tensors = (self.keys, self.values, self.counts, self.retrieval_keys, self.token_ids)
        return sum(t.numel() * t.element_size() for t in tensors)

    def fetch(self, selection: torch.Tensor) -> SelectedNodes:
        b, k = selection.shape
        chunk = torch.arange(b, device=selection.device).unsqueeze(1).expand(b, k)
        return SelectedNodes(
            keys=self.keys[:, chunk, selection].flatten(1, 2),
            values=self.values[:, chunk, selection].flatten(1, 2),
            counts=self.counts[chunk, selection].flatten(),
            chunk_of_row=chunk.flatten(),
        )
