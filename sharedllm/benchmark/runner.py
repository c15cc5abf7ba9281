"""Run the cells in alternation, then reduce them to medians, same-run ratios and targets.

Why this shape: on a shared machine absolute seconds drift from minute to minute, so methods
are compared within one run. Every repetition visits every length, the order of the methods
rotates from one (repetition, length) to the next, and a ratio is the median over repetitions
of the ratio within a repetition (cells that ran minutes apart, not hours).
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sharedllm.benchmark.measure import GRPC_METHOD
from sharedllm.benchmark.services import GrpcTargets, GrpcUnavailable, cell_tenant, child_env, grpc_stack
from sharedllm.benchmark.workload import QUESTIONS, document_tokens

METHOD_ORDER: tuple[str, ...] = ("sharedllm", GRPC_METHOD, "full", "streaming")  # rows of the report
Cell = dict[str, Any]


@dataclass(frozen=True)
class BenchConfig:
    lengths: tuple[int, ...]
    methods: tuple[str, ...]
    repeats: int
    max_new_tokens: int
    model: str | None = None
    adapter: str | None = None
    device: str | None = None
    dtype: str = "auto"
    threads: int | None = None  # torch threads in every cell and service (None: torch's choice)
    grpc: bool = True
    up_to: dict[str, int] = field(default_factory=dict)  # method -> longest document it is measured on

    def model_flags(self) -> list[str]:
        flags = [("--model", self.model), ("--adapter", self.adapter), ("--device", self.device)]
        flags.append(("--dtype", self.dtype if self.dtype != "auto" else None))
        return [part for flag, value in flags if value for part in (flag, value)]

    def runs(self, method: str, length: int) -> bool:
        return length <= self.up_to.get(method, length)


def _methods(config: BenchConfig, with_grpc: bool) -> list[str]:
    return [*config.methods, *([GRPC_METHOD] if with_grpc else [])]


def plan(config: BenchConfig, with_grpc: bool) -> list[tuple[int, int, str]]:
    """(repetition, length, method) in run order, the methods' order rotating so that none always runs first."""
    methods = _methods(config, with_grpc)
    order = []
    for repeat in range(config.repeats):
        for index, length in enumerate(config.lengths):
            wanted = [m for m in methods if config.runs(m, length)]
            turn = (repeat + index) % len(wanted) if wanted else 0
            order += [(repeat, length, m) for m in wanted[turn:] + wanted[:turn]]
    return order


# ---- reduction -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    method: str
    metric: str
    length: int | None = None  # None: the length the ratio is taken at


@dataclass(frozen=True)
class Ratio:
    name: str
    text: str
    numerator: Side
    denominator: Side


@dataclass(frozen=True)
class Target:
    text: str
    ratio: Ratio
    length: int | None  # None: the ratio names its own lengths
    bound: float
    higher_is_better: bool


RATIOS: tuple[Ratio, ...] = tuple(
    Ratio(name, text, Side(*numerator), Side(*denominator))
    for name, text, numerator, denominator in (
        (
            "first_vs_full",
            "first-question TTFT: full attention / SharedLLM",
            ("full", "first_ttft_s"),
            ("sharedllm", "first_ttft_s"),
        ),
        (
            "repeat_vs_full_stateless",
            "repeat TTFT: full attention re-reading the document (its first-question TTFT) / SharedLLM",
            ("full", "first_ttft_s"),
            ("sharedllm", "repeat_ttft_s"),
        ),
        (
            "repeat_vs_full_cached",
            "repeat TTFT: full attention keeping the document's KV cache / SharedLLM",
            ("full", "repeat_ttft_s"),
            ("sharedllm", "repeat_ttft_s"),
        ),
        (
            "first_vs_streaming",
            "first-question TTFT: StreamingLLM / SharedLLM",
            ("streaming", "first_ttft_s"),
            ("sharedllm", "first_ttft_s"),
        ),
        (
            "repeat_vs_streaming",
            "repeat TTFT: StreamingLLM / SharedLLM",
            ("streaming", "repeat_ttft_s"),
            ("sharedllm", "repeat_ttft_s"),
        ),
        (
            "decode_vs_full",
            "decode tokens/s: SharedLLM / full attention",
            ("sharedllm", "decode_tokens_per_s"),
            ("full", "decode_tokens_per_s"),
        ),
        (
            "decode_vs_streaming",
            "decode tokens/s: SharedLLM / StreamingLLM",
            ("sharedllm", "decode_tokens_per_s"),
            ("streaming", "decode_tokens_per_s"),
        ),
        (
            "stored_vs_full",
            "stored bytes: full attention's KV cache / SharedLLM's context",
            ("full", "stored_bytes"),
            ("sharedllm", "stored_bytes"),
        ),
        (
            "memory_vs_full",
            "peak memory: full attention / SharedLLM",
            ("full", "peak_memory_bytes"),
            ("sharedllm", "peak_memory_bytes"),
        ),
        (
            "compress_over_floor",
            "SharedLLM compression / bare forward of the lower M layers",
            ("sharedllm", "compress_s"),
            ("sharedllm", "floor_s"),
        ),
        (
            "grpc_first_over_embedded",
            "first-question TTFT (compression + first token): gRPC + Redis / embedded",
            (GRPC_METHOD, "first_ttft_s"),
            ("sharedllm", "first_ttft_s"),
        ),
        (
            "grpc_repeat_over_embedded",
            "repeat TTFT: gRPC + Redis / embedded",
            (GRPC_METHOD, "repeat_ttft_s"),
            ("sharedllm", "repeat_ttft_s"),
        ),
    )
)
MEMORY_FLATNESS = Ratio(
    "memory_64k_over_8k",
    "SharedLLM peak memory: 64K tokens / 8K tokens",
    Side("sharedllm", "peak_memory_bytes", 65536),
    Side("sharedllm", "peak_memory_bytes", 8192),
)
_BY_NAME = {r.name: r for r in RATIOS}
TARGETS: tuple[Target, ...] = (
    Target("first-question TTFT >= 5x faster than full attention", _BY_NAME["first_vs_full"], 32768, 5.0, True),
    Target(
        "repeat question >= 20x faster than full attention (re-reading the document)",
        _BY_NAME["repeat_vs_full_stateless"],
        32768,
        20.0,
        True,
    ),
    Target(
        "repeat question >= 20x faster than full attention (keeping its KV cache)",
        _BY_NAME["repeat_vs_full_cached"],
        32768,
        20.0,
        True,
    ),
    Target("repeat question >= 2x faster than StreamingLLM", _BY_NAME["repeat_vs_streaming"], 32768, 2.0, True),
    Target("peak memory nearly flat: 64K within 1.5x of 8K", MEMORY_FLATNESS, None, 1.5, False),
    Target(
        "compressor within 1.3x of the bare lower-layer forward", _BY_NAME["compress_over_floor"], 32768, 1.3, False
    ),
    Target(
        "gRPC + Redis within 1.2x of embedded (first question)", _BY_NAME["grpc_first_over_embedded"], 32768, 1.2, False
    ),
    Target(
        "gRPC + Redis within 1.2x of embedded (repeat question)",
        _BY_NAME["grpc_repeat_over_embedded"],
        32768,
        1.2,
        False,
    ),
)


def _value(cells: Iterable[Cell], side: Side, length: int | None, repeat: int) -> float | None:
    wanted = (side.method, side.length or length, repeat)
    for cell in cells:
        if (cell["method"], cell["length"], cell["repeat"]) == wanted and "metrics" in cell:
            return cell["metrics"].get(side.metric)
    return None


def paired_ratio(cells: list[Cell], ratio: Ratio, length: int | None) -> tuple[float | None, int]:
    """Median over repetitions of numerator / denominator within each repetition, and how many pairs."""
    values = []
    for repeat in sorted({c["repeat"] for c in cells}):
        num = _value(cells, ratio.numerator, length, repeat)
        den = _value(cells, ratio.denominator, length, repeat)
        if num is not None and den:
            values.append(num / den)
    return (statistics.median(values) if values else None), len(values)


def medians(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per (method, length): the median of every numeric metric over the repetitions that succeeded."""
    rows = []
    for method, length in sorted(
        {(c["method"], c["length"]) for c in cells}, key=lambda k: (k[1], METHOD_ORDER.index(k[0]))
    ):
        done = [c["metrics"] for c in cells if (c["method"], c["length"]) == (method, length) and "metrics" in c]
        row: dict[str, Any] = {"method": method, "length": length, "repetitions": len(done)}
        for metric in sorted({k for m in done for k, v in m.items() if isinstance(v, int | float)}):
            values = [m[metric] for m in done if isinstance(m.get(metric), int | float)]
            row[metric] = statistics.median(values)
        rows.append(row)
    return rows


def summarize(cells: list[Cell], lengths: Iterable[int]) -> dict[str, Any]:
    """Medians, every ratio at every length, and each target with its value and whether it is met."""
    ratios = []
    for length in lengths:
        for ratio in RATIOS:
            value, pairs = paired_ratio(cells, ratio, length)
            if value is not None:
                ratios.append(
                    {"name": ratio.name, "text": ratio.text, "length": length, "value": value, "pairs": pairs}
                )
    targets = []
    for target in TARGETS:
        value, pairs = paired_ratio(cells, target.ratio, target.length)
        met = None if value is None else (value >= target.bound if target.higher_is_better else value <= target.bound)
        targets.append(
            {
                "text": target.text,
                "ratio": target.ratio.name,
                "length": target.length,
                "bound": target.bound,
                "higher_is_better": target.higher_is_better,
                "value": value,
                "pairs": pairs,
                "met": met,
            }
        )
    return {"medians": medians(cells), "ratios": ratios, "targets": targets}


# ---- running -----------------------------------------------------------------------------------


def _proc_field(path: str, name: str) -> str | None:
    """A `name: value` line of a /proc file (Linux), else None."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    match = re.search(rf"^{name}\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def describe_machine(device: str | None) -> dict[str, Any]:
    """What the numbers were measured on; without it two benchmarks cannot be compared."""
    import torch
    import transformers

    memory_kib = _proc_field("/proc/meminfo", "MemTotal")
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": int(memory_kib.split()[0]) << 10 if memory_kib else None,
        "gpu": torch.cuda.get_device_name(torch.device(device or "cuda")) if cuda else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_start": os.getloadavg(),
    }


def _run_cell(
    config: BenchConfig, tokens: Path, grpc: GrpcTargets | None, repeat: int, length: int, method: str
) -> Cell:
    args = [sys.executable, "-m", "sharedllm.benchmark.cell", "--method", method, "--length", str(length)]
    args += ["--tokens", str(tokens), "--repeat", str(repeat), "--max-new-tokens", str(config.max_new_tokens)]
    args += config.model_flags()
    env = child_env(config.threads)
    if method == GRPC_METHOD and grpc is not None:
        args += ["--compressor", grpc.compressor, "--decoder", grpc.decoder]
        env["SHAREDLLM_API_KEY"] = grpc.api_keys[cell_tenant(repeat, length)]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        if done.returncode < 0:  # SIGKILL is what the kernel's out-of-memory killer sends
            error = f"killed by {signal.Signals(-done.returncode).name}"
        else:
            error = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"method": method, "length": length, "repeat": repeat, "error": error, "wall_s": wall}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": wall}


def run_benchmark(config: BenchConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every cell of the plan, then the summary; `progress` hears one line per cell."""
    from transformers import AutoTokenizer

    from sharedllm.common.model_loading import resolve_model_path

    started = time.perf_counter()
    machine = describe_machine(config.device)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(config.model)), local_files_only=True)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="sharedllm-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        tokens = workdir / "document.npy"
        np.save(tokens, np.asarray(document_tokens(tokenizer, max(config.lengths)), dtype=np.uint32))
        grpc, grpc_status = None, "not measured (--no-grpc)"
        if config.grpc:
            progress("starting redis-server and the gRPC services ...")
            try:
                tenants = [cell_tenant(r, n) for r, n, m in plan(config, True) if m == GRPC_METHOD]
                grpc = stack.enter_context(grpc_stack(workdir, config.model_flags(), config.threads, tenants))
                grpc_status = "measured (private redis-server and both services on loopback)"
            except GrpcUnavailable as exc:
                grpc_status = f"not available: {exc}"
                progress(f"grpc: {grpc_status}")
        order = plan(config, grpc is not None)
        for index, (repeat, length, method) in enumerate(order, 1):
            cell = _run_cell(config, tokens, grpc, repeat, length, method)
            outcome = f"error: {cell['error']}" if "error" in cell else f"{cell['wall_s']:.1f} s"
            progress(f"[{index}/{len(order)}] repetition {repeat + 1}, {length} tokens, {method}: {outcome}")
            cells.append(cell)
    machine["load_average_end"] = os.getloadavg()
    setup = {
        **asdict(config),
        "engine": {k: v for c in cells for k, v in c.get("engine", {}).items()},
        "questions": list(QUESTIONS),
        "document": "King James Bible from Ruth onwards, cut by token count",
        "grpc": grpc_status,
        "skipped": [
            f"{m} at {n} tokens (--up-to {m}={config.up_to[m]})"
            for n in config.lengths
            for m in _methods(config, grpc is not None)
            if not config.runs(m, n)
        ],
    }
    return {
        "machine": machine,
        "setup": setup,
        "cells": cells,
        **summarize(cells, config.lengths),
        "wall_s": time.perf_counter() - started,
    }
