"""Benchmark the tree kernels against the copy bandwidth of the device and the torch reference.

Both kernels are memory-bound, so the figure of merit is achieved bandwidth as a fraction of a
plain device-to-device copy: bytes that must move (each distinct input element read once, every
output written once) divided by the time. Sizes follow a Llama-2-7B-shaped lower model (M = 4
layers, 32 kv heads, head dim 128, bf16) and a tree of chunk 1024, depth 3 (14 nodes), P = 32.

    python bench/bench_kernels.py [--sizes 128k,16k] [--json PATH]
    python bench/bench_kernels.py --cpu     # no GPU: time the torch reference on a small size

Without CUDA (and without --cpu) it says so and exits 0, so it can sit in any pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from sharedllm.common.kernels import reference, triton_kernels

SIZES = {"128k": 131072, "32k": 32768, "16k": 16384, "2k": 2048}
L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2, so every timed run starts cold


@dataclass(frozen=True)
class Shape:
    """A document of `tokens` tokens on the lower model; everything else is derived from it."""

    tokens: int
    layers: int = 4
    heads: int = 32
    head_dim: int = 128
    chunk: int = 1024
    depth: int = 3
    pool: int = 32
    dtype: torch.dtype = torch.bfloat16

    @property
    def chunks(self) -> int:
        return math.ceil(self.tokens / self.chunk)

    @property
    def nodes(self) -> int:
        return 2 ** (self.depth + 1) - 2


@dataclass
class Row:
    """One line of the table (times in ms, bandwidth in GB/s; None where it was not measured)."""

    size: str
    kernel: str
    bytes_moved: int
    triton_ms: float | None
    torch_ms: float | None
    triton_gbps: float | None
    copy_fraction: float | None
    speedup: float | None


def tree_plan(shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """seq/start/end of every node of every chunk, encoded single-pass (chunk b is sequence b).

    A node [s, e) of n tokens is cut into E = min(n, P) blocks [s + bn/E, s + (b+1)n/E), the
    slots b >= E left empty, as the compressor does.
    """
    levels = torch.cat([torch.full((2**lv,), lv) for lv in range(1, shape.depth + 1)])
    index = torch.cat([torch.arange(2**lv) for lv in range(1, shape.depth + 1)])
    parts = 2**levels
    s = index * shape.chunk // parts
    n = (index + 1) * shape.chunk // parts - s
    blocks = n.clamp(max=shape.pool).unsqueeze(1)
    slot = torch.arange(shape.pool).unsqueeze(0)
    used = slot < blocks
    start = torch.where(used, s.unsqueeze(1) + slot * n.unsqueeze(1) // blocks, (s + n).unsqueeze(1))
    end = torch.where(used, s.unsqueeze(1) + (slot + 1) * n.unsqueeze(1) // blocks, (s + n).unsqueeze(1))
    b = shape.chunks
    seq = torch.arange(b).unsqueeze(1).expand(b, shape.nodes)
    return (
        seq.contiguous().to(device),
        start.expand(b, -1, -1).contiguous().to(device),
        end.expand(b, -1, -1).contiguous().to(device),
    )


def pool_bytes(x: torch.Tensor, seq: torch.Tensor, start: torch.Tensor, end: torch.Tensor, mode: str) -> int:
    """Distinct input tokens read (the union of the blocks, or their last tokens) plus the output."""
    g, s, h, length, dh = x.shape
    covered = torch.zeros(s, length + 1, dtype=torch.int32, device=x.device)
    seq_e = seq.unsqueeze(-1).expand_as(start)
    valid = end > start
    if mode == "mean":
        ones = valid.to(torch.int32)
        covered.index_put_((seq_e, start), ones, accumulate=True)
        covered.index_put_((seq_e, end), -ones, accumulate=True)
        tokens = int((covered.cumsum(1) > 0).sum())
    else:
        covered[seq_e[valid], end[valid] - 1] = 1
        tokens = int(covered.sum())
    out_elements = g * start.numel() * h * dh
    return (g * tokens * h * dh + out_elements) * x.element_size()


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of `fn` in ms; on CUDA with events, the L2 flushed before each run."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        for _ in range(iters):
            scratch.zero_()
            begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            finish.record()
            torch.cuda.synchronize(device)
            samples.append(begin.elapsed_time(finish))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_gbps(device: torch.device, warmup: int, iters: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), the ceiling to compare to."""
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, iters)
    return 2 * nbytes / ms / 1e6


def measure(
    size: str,
    kernel: str,
    nbytes: int,
    fast: Callable[[], object] | None,
    slow: Callable[[], object],
    device: torch.device,
    copy: float | None,
    args: argparse.Namespace,
) -> Row:
    """Time the Triton call (if any) and the reference; the reference may not fit in memory."""
    fast_ms = time_ms(fast, device, args.warmup, args.iters) if fast is not None else None
    try:
        slow_ms = time_ms(slow, device, args.warmup, args.iters)
    except torch.OutOfMemoryError:
        slow_ms = None
    gbps = nbytes / fast_ms / 1e6 if fast_ms else None
    return Row(
        size=size,
        kernel=kernel,
        bytes_moved=nbytes,
        triton_ms=fast_ms,
        torch_ms=slow_ms,
        triton_gbps=gbps,
        copy_fraction=gbps / copy if gbps and copy else None,
        speedup=slow_ms / fast_ms if fast_ms and slow_ms else None,
    )


def bench_size(
    size: str, shape: Shape, device: torch.device, copy: float | None, args: argparse.Namespace
) -> list[Row]:
    """Pooling (both modes) and the injection gather of one document size."""
    use_triton = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    m, b, h, dh, p = shape.layers, shape.chunks, shape.heads, shape.head_dim, shape.pool
    rows: list[Row] = []

    # Keys and values of M layers, [2M, chunks, H, C, Dh], pooled into every node in one call.
    x = torch.randn((2 * m, b, h, shape.chunk, dh), generator=gen, device=device, dtype=shape.dtype)
    seq, start, end = tree_plan(shape, device)
    for mode in ("last", "mean"):
        fast = partial(triton_kernels.pool_nodes, x, seq, start, end, mode) if use_triton else None
        slow = partial(reference.pool_nodes, x, seq, start, end, mode)
        nbytes = pool_bytes(x, seq, start, end, mode)
        rows.append(measure(size, f"pool {mode}", nbytes, fast, slow, device, copy, args))
    del x

    # One question's selection: D + 1 nodes of every chunk, read from the stored tree table.
    keys = torch.randn((m, b * shape.nodes, p, h, dh), generator=gen, device=device, dtype=shape.dtype)
    values = torch.randn_like(keys)
    counts = torch.full((b * shape.nodes,), p, dtype=torch.int32, device=device)
    per_chunk = shape.depth + 1
    chunk_of_row = torch.arange(b, device=device).repeat_interleave(per_chunk)
    picks = torch.randint(0, shape.nodes, (b * per_chunk,), generator=gen, device=device)
    sel = chunk_of_row * shape.nodes + picks
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dh, 2, device=device, dtype=torch.float32) / dh)
    angles = torch.outer(torch.arange(b, device=device, dtype=torch.float32), inv_freq).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()
    gather_args = (keys, values, counts, sel, chunk_of_row, cos, sin)
    fast = partial(triton_kernels.gather_injection, *gather_args) if use_triton else None
    slow = partial(reference.gather_injection, *gather_args)
    nbytes = 2 * 2 * m * sel.numel() * p * h * dh * keys.element_size()  # keys and values, in and out
    rows.append(measure(size, "gather+rope", nbytes, fast, slow, device, copy, args))
    return rows


def print_table(device_name: str, copy: float | None, rows: list[Row]) -> None:
    """The human-readable report."""
    print(f"device: {device_name}")
    if copy is not None:
        print(f"copy bandwidth (read + write): {copy:.0f} GB/s; L2 flushed before every timed run")
    print("MB = distinct inputs read once + outputs written\n")
    header = (
        f"{'size':>5} {'kernel':<12} {'MB':>9} {'triton ms':>10} {'GB/s':>7} {'of copy':>8} "
        f"{'torch ms':>10} {'speed-up':>9}"
    )
    print(header)
    print("-" * len(header))

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        print(
            f"{r.size:>5} {r.kernel:<12} {r.bytes_moved / 1e6:>9.1f} {fmt(r.triton_ms, '.3f'):>10} "
            f"{fmt(r.triton_gbps, '.0f'):>7} {fmt(r.copy_fraction, '.0%'):>8} "
            f"{fmt(r.torch_ms, '.3f'):>10} {fmt(r.speedup, '.1f'):>9}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128k,16k", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cpu", action="store_true", help="without CUDA: time the torch reference on 2k tokens")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")

    if torch.cuda.is_available():
        if not triton_kernels.triton_available():
            print("Triton is not installed: nothing to benchmark against the reference.")
            return 0
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(device)
        copy = copy_gbps(device, args.warmup, args.iters)
    elif args.cpu:
        device, device_name, copy, sizes = torch.device("cpu"), "cpu (torch reference only)", None, ["2k"]
    else:
        print("No CUDA device: the Triton kernels cannot be benchmarked here (--cpu times the reference).")
        return 0

    rows = [row for size in sizes for row in bench_size(size, Shape(SIZES[size]), device, copy, args)]
    print_table(device_name, copy, rows)
    if args.json:
        report = {"device": device_name, "copy_gbps": copy, "results": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
