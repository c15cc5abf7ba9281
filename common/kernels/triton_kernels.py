"""Triton kernels for the context tree: multi-level pooling and the injection gather.

They reproduce `sharedllm.common.kernels.reference` exactly ("last" pooling, gathers) or to rounding
("mean" pooling, the rotation of keys), each in a single launch: pooling covers every level of
every chunk and every layer at once, and the gather moves keys and values together, so the
cost is one pass over the bytes instead of one small launch per level, layer or tensor.

Triton is imported under a guard: the module imports where Triton is missing (CPU-only
installs), and the launch wrappers raise `TritonUnavailable` if called there. On a CPU the kernels run only
under Triton's interpreter, which must be switched on (`TRITON_INTERPRET=1`) before this module
is first imported, because `triton.jit` chooses between compiling and interpreting when it
decorates a function.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the wrappers explain instead of failing at import
    triton = None
    tl = None

# What `triton.jit` consults when it decorates the kernels below, read at the same moment.
_INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)

# Elements of one [BLOCK_P, BLOCK_D] tile: a 32 x 128 tile is 32 fp32 registers a thread for
# 4 warps, enough bytes in flight per program without spilling.
_TILE_ELEMENTS = 4096
# No FMA contraction: fp32 rotated keys then match the (unfused) reference bit for bit, and the
# results do not change with Triton's default, which flips in 3.10.
_COMPILE_OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}


class TritonUnavailable(RuntimeError):
    """The Triton kernels cannot run here: Triton is missing, or the tensors are on the CPU
    without Triton's interpreter."""


def triton_available() -> bool:
    """Whether Triton imported, i.e. whether the kernels below exist at all."""
    return triton is not None


def interpreter_enabled() -> bool:
    """Whether the kernels of this process run in Triton's interpreter, which accepts CPU tensors.

    Decided once, when this module was imported: setting `TRITON_INTERPRET` later changes nothing.
    """
    return _INTERPRETED


def _require_triton(*tensors: torch.Tensor) -> None:
    """Fail with a clear message instead of a Triton launch error deep inside the driver."""
    if triton is None:
        raise TritonUnavailable("Triton is not installed; use the torch reference (SHAREDLLM_KERNELS=torch)")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if next(iter(devices)).type != "cuda" and not interpreter_enabled():
        raise TritonUnavailable(
            "the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before this module is "
            "imported to run them on the CPU through Triton's interpreter"
        )


def _blocks(n_rows: int, width: int) -> tuple[int, int]:
    """Tile sizes: the whole (padded) head dimension, and as many rows as fit in one tile."""
    block_d = triton.next_power_of_2(width)
    block_rows = min(triton.next_power_of_2(n_rows), max(1, _TILE_ELEMENTS // block_d))
    return block_rows, block_d


def _launch(kernel: Any, grid: tuple[int, ...], device: torch.device, *args: Any, **kwargs: Any) -> None:
    """Launch on the tensors' own GPU, which need not be the current one."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


if triton is not None:

    @triton.jit
    def _pool_nodes_kernel(
        x_ptr,
        seq_ptr,
        start_ptr,
        end_ptr,
        out_ptr,
        B,
        N,
        P,
        H,
        Dh,
        n_pblocks,
        sx_g,
        sx_s,
        sx_h,
        sx_l,
        sx_d,
        sq_b,
        sq_n,
        ss_b,
        ss_n,
        ss_p,
        se_b,
        se_n,
        se_p,
        MEAN: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program = one head of BLOCK_P slots of one node of one group. For a fixed head a
        # token's Dh entries are contiguous in x [G, S, H, L, Dh], so every row load is one
        # coalesced segment. Offsets are int64: x of a long document exceeds 2**31 elements.
        pid = tl.program_id(0).to(tl.int64)
        h = pid % H
        rest = pid // H
        pblock = rest % n_pblocks
        rest = rest // n_pblocks
        n = rest % N
        rest = rest // N
        b = rest % B
        g = rest // B

        p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
        d = tl.arange(0, BLOCK_D)
        p_ok = p < P
        d_ok = d < Dh
        tile_ok = p_ok[:, None] & d_ok[None, :]

        s = tl.load(seq_ptr + b * sq_b + n * sq_n).to(tl.int64)
        lo = tl.load(start_ptr + b * ss_b + n * ss_n + p * ss_p, mask=p_ok, other=0).to(tl.int64)
        hi = tl.load(end_ptr + b * se_b + n * se_n + p * se_p, mask=p_ok, other=0).to(tl.int64)
        base = x_ptr + g * sx_g + s * sx_s + h * sx_h + d[None, :] * sx_d

        if MEAN:
            width = hi - lo  # 0 for empty and padding slots, so they sum nothing
            acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
            # Walk all slots' blocks in step: iteration w reads token lo + w of every slot.
            for w in range(0, tl.max(width, axis=0)):
                row_ok = (w < width)[:, None] & tile_ok
                acc += tl.load(base + (lo + w)[:, None] * sx_l, mask=row_ok, other=0.0).to(tl.float32)
            result = acc / tl.maximum(width, 1).to(tl.float32)[:, None]
        else:
            valid = (hi > lo)[:, None] & tile_ok
            result = tl.load(base + (hi - 1)[:, None] * sx_l, mask=valid, other=0.0)

        out_row = (((g * B + b) * N + n) * P + p) * H + h
        tl.store(
            out_ptr + out_row[:, None] * Dh + d[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=tile_ok,
        )

    @triton.jit
    def _gather_injection_kernel(
        k_ptr,
        v_ptr,
        rows_ptr,
        chunk_ptr,
        cos_ptr,
        sin_ptr,
        k_out_ptr,
        v_out_ptr,
        S,
        P,
        H,
        Dh,
        n_pblocks,
        sr,
        sch,
        sk_m,
        sk_t,
        sk_p,
        sk_h,
        sk_d,
        sv_m,
        sv_t,
        sv_p,
        sv_h,
        sv_d,
        sc_c,
        sc_d,
        sn_c,
        sn_d,
        ROPE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One program = BLOCK_P entries of one head of one selected node of one layer, keys and
        # values both. Slot blocks vary fastest so neighbouring programs fill neighbouring
        # output rows of [M, H, S * P, Dh].
        pid = tl.program_id(0).to(tl.int64)
        pblock = pid % n_pblocks
        rest = pid // n_pblocks
        s = rest % S
        rest = rest // S
        h = rest % H
        m = rest // H

        p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
        d = tl.arange(0, BLOCK_D)
        tile_ok = (p < P)[:, None] & (d < Dh)[None, :]
        row = tl.load(rows_ptr + s * sr).to(tl.int64)
        dtype = k_out_ptr.dtype.element_ty

        dst = ((m * H + h) * (S * P) + s * P + p)[:, None] * Dh + d[None, :]
        v_src = v_ptr + m * sv_m + row * sv_t + p[:, None] * sv_p + h * sv_h
        tl.store(v_out_ptr + dst, tl.load(v_src + d[None, :] * sv_d, mask=tile_ok), mask=tile_ok)

        k_src = k_ptr + m * sk_m + row * sk_t + p[:, None] * sk_p + h * sk_h
        k = tl.load(k_src + d[None, :] * sk_d, mask=tile_ok)
        if ROPE:
            # rotate_half: the first Dh - Dh//2 outputs take -x[d + Dh//2], the rest x[d - first].
            first = Dh - Dh // 2
            lower = d < first
            partner = tl.where(lower, d + Dh // 2, d - first)
            sign = tl.where(lower, -1.0, 1.0)
            k_partner = tl.load(k_src + partner[None, :] * sk_d, mask=tile_ok, other=0.0)
            chunk = tl.load(chunk_ptr + s * sch).to(tl.int64)
            # The tables are rounded to the keys' dtype first, as the reference does.
            cos = tl.load(cos_ptr + chunk * sc_c + d * sc_d, mask=d < Dh, other=0.0).to(dtype).to(tl.float32)
            sin = tl.load(sin_ptr + chunk * sn_c + d * sn_d, mask=d < Dh, other=0.0).to(dtype).to(tl.float32)
            rotated = k.to(tl.float32) * cos[None, :] + k_partner.to(tl.float32) * (sign * sin)[None, :]
            k = rotated.to(dtype)
        tl.store(k_out_ptr + dst, k, mask=tile_ok)


def pool_nodes(x: torch.Tensor, seq: torch.Tensor, start: torch.Tensor, end: torch.Tensor, mode: str) -> torch.Tensor:
    """Triton `pool_nodes`: same arguments and result as `reference.pool_nodes`, one launch."""
    if mode not in ("last", "mean"):
        raise ValueError(f"unknown pooling mode {mode!r}; expected 'last' or 'mean'")
    _require_triton(x, seq, start, end)
    g, _, h, _, dh = x.shape
    b, n, p = start.shape
    if tuple(seq.shape) != (b, n) or end.shape != start.shape:
        raise ValueError(
            f"seq must be [B, N] and end like start [B, N, P]; got seq {tuple(seq.shape)}, "
            f"start {tuple(start.shape)}, end {tuple(end.shape)}"
        )
    out = torch.empty((g, b, n, p, h, dh), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_p, block_d = _blocks(p, dh)
    n_pblocks = triton.cdiv(p, block_p)
    _launch(
        _pool_nodes_kernel,
        (g * b * n * n_pblocks * h,),
        x.device,
        x,
        seq,
        start,
        end,
        out,
        b,
        n,
        p,
        h,
        dh,
        n_pblocks,
        *x.stride(),
        *seq.stride(),
        *start.stride(),
        *end.stride(),
        MEAN=mode == "mean",
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        **_COMPILE_OPTIONS,
    )
    return out


def gather_injection(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    rows: torch.Tensor,
    chunk_of_row: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `gather_injection`: same arguments and results as the reference, one launch.

    Rotated keys are computed in fp32 and rounded once, so in fp16/bf16 they may differ from
    the reference (which rounds after each operation) by about one unit in the last place.
    """
    rope = cos is not None and sin is not None
    tables = (cos, sin) if rope else ()
    _require_triton(keys, values, counts, rows, chunk_of_row, *tables)
    if keys.shape != values.shape or keys.dtype != values.dtype:
        raise ValueError(
            f"keys and values must match; got {tuple(keys.shape)} {keys.dtype} and {tuple(values.shape)} {values.dtype}"
        )
    m, _, p, h, dh = keys.shape
    s = rows.shape[0]
    k_out = torch.empty((m, h, s * p, dh), dtype=keys.dtype, device=keys.device)
    v_out = torch.empty_like(k_out)
    mask = (torch.arange(p, device=keys.device).unsqueeze(0) < counts[rows].unsqueeze(1)).reshape(-1)
    if k_out.numel() == 0:
        return k_out, v_out, mask
    block_p, block_d = _blocks(p, dh)
    n_pblocks = triton.cdiv(p, block_p)
    # Without rotation the table pointers are never read; pass the keys to fill the slots.
    cos_t, sin_t = (cos, sin) if rope else (keys, keys)
    _launch(
        _gather_injection_kernel,
        (m * h * s * n_pblocks,),
        keys.device,
        keys,
        values,
        rows,
        chunk_of_row,
        cos_t,
        sin_t,
        k_out,
        v_out,
        s,
        p,
        h,
        dh,
        n_pblocks,
        rows.stride(0),
        chunk_of_row.stride(0),
        *keys.stride(),
        *values.stride(),
        *(cos.stride() if rope else (0, 0)),
        *(sin.stride() if rope else (0, 0)),
        ROPE=rope,
        BLOCK_P=block_p,
        BLOCK_D=block_d,
        **_COMPILE_OPTIONS,
    )
    return k_out, v_out, mask
