"""Torch reference implementations of the tree kernels.

These define the semantics the Triton kernels must reproduce, and they are what runs on
devices without Triton (the CPU). Both work on whole batches: every level of every chunk in
one call, so that the Triton versions can do the same in one launch.
"""

from __future__ import annotations

import torch


def pool_nodes(x: torch.Tensor, seq: torch.Tensor, start: torch.Tensor, end: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool encoded keys or values into fixed-size node slots.

    x:     [G, S, H, L, Dh]  encoded sequences (G groups, e.g. keys and values of M layers)
    seq:   [B, N]            the sequence of x each node was cut from
    start: [B, N, P]         first token of each slot's block, in that sequence
    end:   [B, N, P]         one past the last token; an empty slot has start == end
    mode:  "last" keeps token end-1 of the block, "mean" averages the block (fp32 sums)
    returns [G, B, N, P, H, Dh] in x's dtype, zeros in empty slots.
    """
    g, s, h, seq_len, dh = x.shape
    b, n, p = start.shape
    xt = x.permute(0, 1, 3, 2, 4)  # [G, S, L, H, Dh]
    seq_e = seq.unsqueeze(-1).expand(b, n, p)
    valid = (end > start).view(1, b, n, p, 1, 1)
    if mode == "last":
        last = (end - 1).clamp(min=0)
        out = xt[:, seq_e, last]
        return torch.where(valid, out, torch.zeros((), dtype=x.dtype, device=x.device))
    if mode == "mean":
        csum = torch.zeros(g, s, seq_len + 1, h, dh, dtype=torch.float32, device=x.device)
        torch.cumsum(xt.float(), dim=2, out=csum[:, :, 1:])
        total = csum[:, seq_e, end] - csum[:, seq_e, start]
        width = (end - start).clamp(min=1).to(torch.float32).view(1, b, n, p, 1, 1)
        out = torch.where(valid, total / width, torch.zeros((), device=x.device))
        return out.to(x.dtype)
    raise ValueError(f"unknown pooling mode {mode!r}; expected 'last' or 'mean'")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE pairing: (x1, x2) -> (-x2, x1) over the two halves of the head."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def gather_injection(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    rows: torch.Tensor,
    chunk_of_row: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather selected nodes into the layout cross-attention reads, rotating keys once.

    keys, values: [M, T, P, H, Dh]  a table of nodes
    counts:       [T]               valid entries per node
    rows:         [S]               the nodes to read, in document order
    chunk_of_row: [S]               chunk index of each read node (its RoPE position)
    cos, sin:     [n_chunks, Dh]    chunk-level rotation tables, or None for no rotation
    returns keys and values [M, H, S * P, Dh] and a validity mask [S * P].
    """
    m, _, p, h, dh = keys.shape
    k = keys[:, rows]  # [M, S, P, H, Dh]
    v = values[:, rows]
    if cos is not None and sin is not None:
        c = cos[chunk_of_row].view(1, -1, 1, 1, dh).to(k.dtype)
        s = sin[chunk_of_row].view(1, -1, 1, 1, dh).to(k.dtype)
        k = k * c + rotate_half(k) * s
    mask = torch.arange(p, device=keys.device).unsqueeze(0) < counts[rows].unsqueeze(1)
    k = k.permute(0, 3, 1, 2, 4).reshape(m, h, -1, dh)
    v = v.permute(0, 3, 1, 2, 4).reshape(m, h, -1, dh)
    return k, v, mask.reshape(-1)
