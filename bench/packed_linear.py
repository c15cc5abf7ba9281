"""The base model's linears packed for oneDNN against plain `F.linear` (MKL), on the CPU.

    python bench/packed_linear.py --json bench/results/concurrency/packed-linear.json

The facts behind common/kernels/packed_linear.py and the scheduler's exactness, in one run:
1. products of M rows by a stack of weights shaped as the default model's 30 layers (425 MB,
   so they come from memory as in a decode step, not from cache) and by its head, plain and
   packed (median of 5 passes);
2. which row counts give row 0 other bits than a product of one row, plain and packed;
3. attention (the CPU's scaled_dot_product_attention): whether a prompt's queries get the same
   bits read whole and from a later position on; how far a padded batch moves a row; the decode
   attention of 16 rows row by row against one padded call;
4. the default model itself: a decode step of 1, 8 and 16 rows (700-token caches) and a
   600-token prompt, with its linears packed and plain (the same weights), taking turns;
5. the resident memory of a process that loaded the model and ran it, packed and plain, and what
   the products compiled for 600 prompt lengths keep, with oneDNN's caches bounded and not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sharedllm.benchmark.report import write_json
from sharedllm.benchmark.timing import alternating_ms, median_ms
from sharedllm.common.kernels.packed_linear import PackedLinear

HIDDEN, MLP, VOCAB, LAYERS = 576, 1536, 49152, 30
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
LAYER_SHAPES = [(HIDDEN, HIDDEN)] * 2 + [(KV_HEADS * HEAD_DIM, HIDDEN)] * 2 + [(MLP, HIDDEN)] * 2 + [(HIDDEN, MLP)]
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)

MEMORY_PROBE = """
import sys, torch
from sharedllm.common import model_loading
if sys.argv[1] == "plain":
    model_loading.pack_linears = lambda model: 0
loaded = model_loading.load_model(None, "cpu")
with torch.inference_mode():
    loaded.model(torch.arange(100).unsqueeze(0))
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
print(int(status["VmRSS"].split()[0]) // 1024)
"""


def packed_of(weight: torch.Tensor) -> PackedLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return PackedLinear(linear.requires_grad_(False))


# The default model's four layer shapes through prompts of 1 to 600 tokens, one product each: how
# much the products compiled for each new shape keep (oneDNN's caches, bounded by packed_linear).
SHAPES_PROBE = """
import os, sys, torch
from torch import nn
if sys.argv[1] != "bounded":
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = os.environ["LRU_CACHE_CAPACITY"] = "1024"
from sharedllm.common.kernels.packed_linear import pack_linears
def resident():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
layers = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in shapes).requires_grad_(False)
pack_linears(layers)
before = resident()
with torch.inference_mode():
    for rows in range(1, 601):
        for layer in layers:
            layer(torch.zeros(1, rows, layer.in_features))
print(resident() - before)
"""


def per_rows(run: Callable[[dict[int, torch.Tensor]], object], inputs: dict, repeats: int) -> dict[int, float]:
    return {m: median_ms(lambda x=x: run(x), repeats) for m, x in inputs.items()}


def products(repeats: int) -> dict[str, dict[str, dict[int, float]]]:
    """Milliseconds for M rows through every layer's weights, and through the head."""
    stack = [torch.randn(n, k) * 0.02 for _ in range(LAYERS) for n, k in LAYER_SHAPES]
    head = torch.randn(VOCAB, HIDDEN) * 0.02
    times: dict[str, dict[str, dict[int, float]]] = {}
    for name, weights, rows in (("layers", stack, (*ROWS, 600)), ("head", [head], ROWS)):
        packed = [packed_of(w) for w in weights]
        inputs = {m: {k: torch.randn(m, k) for k in (HIDDEN, MLP)} for m in rows}
        times[name] = {
            "plain": per_rows(
                lambda x, weights=weights: [F.linear(x[w.shape[1]], w) for w in weights], inputs, repeats
            ),
            "packed": per_rows(lambda x, packed=packed: [p(x[p.in_features]) for p in packed], inputs, repeats),
        }
    return times


def differing_rows() -> dict[str, list[int]]:
    """Row counts whose product gives a row other bits than a product of that row alone (rows 0
    and the last, up to the scheduler's largest prompt piece)."""
    weight = torch.randn(MLP, HIDDEN) * 0.02
    packed = packed_of(weight)
    x = torch.randn(4096, HIDDEN)
    counts = [*range(1, 41), 64, 512, 600, 1100, 2048, 4096]
    found = {}
    for name, product in (("plain", lambda rows: F.linear(rows, weight)), ("packed", packed)):
        alone = {m: product(x[m - 1 : m]) for m in counts}
        first = product(x[:1])
        found[name] = [
            m
            for m in counts
            if not (torch.equal(product(x[:m])[:1], first) and torch.equal(product(x[:m])[-1:], alone[m]))
        ]
    return found


def attention_bits(repeats: int) -> dict[str, object]:
    """A 1,200-token prompt's attention read whole against pieces [start, end) of it; how far a
    padded batch moves one row; and the decode attention of 16 rows (700 to 1,000 cached tokens,
    30 layers) row by row against one padded call (ms)."""
    q = torch.randn(1, HEADS, 1200, HEAD_DIM)
    k, v = torch.randn(1, KV_HEADS, 1200, HEAD_DIM), torch.randn(1, KV_HEADS, 1200, HEAD_DIM)

    def read(start: int, end: int) -> torch.Tensor:
        mask = torch.ones(end - start, end, dtype=torch.bool).tril(start)
        return F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask, enable_gqa=True
        )

    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    cuts = ((0, 600), (128, 256), (200, 500), (512, 640), (600, 637), (37, 1200), (512, 1200), (1100, 1200))
    pieces = {f"{s}-{e}": torch.equal(read(s, e) if s else read_first(q, k, v, e), whole[:, :, s:e]) for s, e in cuts}
    qp = torch.randn(4, HEADS, 1, HEAD_DIM)
    kp, vp = torch.randn(4, KV_HEADS, 650, HEAD_DIM), torch.randn(4, KV_HEADS, 650, HEAD_DIM)
    mask = torch.zeros(4, 1, 1, 650, dtype=torch.bool)
    mask[..., :600] = True
    batched = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)[2]
    alone = F.scaled_dot_product_attention(qp[2:3], kp[2:3, :, :600], vp[2:3, :, :600], enable_gqa=True)[0]
    lengths = [700 + 20 * row for row in range(16)]
    caches = [torch.randn(2, 16, KV_HEADS, 1000, HEAD_DIM) for _ in range(LAYERS)]  # keys, values
    rows = torch.randn(16, HEADS, 1, HEAD_DIM)
    padded = torch.zeros(16, 1, 1, max(lengths), dtype=torch.bool)
    for row, n in enumerate(lengths):
        padded[row, ..., :n] = True

    def row_by_row() -> None:
        for kv in caches:
            for row, n in enumerate(lengths):
                F.scaled_dot_product_attention(
                    rows[row : row + 1], kv[0, row : row + 1, :, :n], kv[1, row : row + 1, :, :n], enable_gqa=True
                )

    def one_call() -> None:
        for kv in caches:
            n = max(lengths)
            F.scaled_dot_product_attention(rows, kv[0, :, :, :n], kv[1, :, :, :n], attn_mask=padded, enable_gqa=True)

    return {
        "same bits as whole, by piece": pieces,
        "padded batch shift": float((batched - alone).abs().max()),
        "decode attention of 16 rows, ms": alternating_ms(
            {"row by row": (lambda: None, row_by_row), "one padded call": (lambda: None, one_call)}, repeats
        ),
    }


def read_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, end: int) -> torch.Tensor:
    """The first `end` queries as a prompt of that length reads them (causal, no mask)."""
    return F.scaled_dot_product_attention(q[:, :, :end], k[:, :, :end], v[:, :, :end], is_causal=True, enable_gqa=True)


def model_steps(repeats: int) -> dict[str, dict[str, float]]:
    """The default model's step times with its linears packed and plain (the same weights), the
    two taking turns so that the machine's drift falls on both alike."""
    from sharedllm.common.engine.engine import Engine

    engine = Engine.load(device="cpu")
    model, decoder = engine.loaded.model, engine.decoder
    packed = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    plain = {name: m.to_linear() for name, m in packed.items()}

    def use(modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)

    prompt = torch.randint(0, 40000, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    figures: dict[str, dict[str, float]] = {"packed": {}, "plain": {}}
    with torch.inference_mode():
        cases: dict[str, Callable[[], object]] = {
            "prompt 600": lambda: decoder.step_rows([prompt], [engine.body.new_cache(600)], [None])
        }
        for rows in (1, 8, 16):
            caches = [engine.body.new_cache(701) for _ in range(rows)]
            for cache in caches:
                decoder.step_rows([prompt + prompt[:100]], [cache], [None])

            def step(caches: list = caches) -> object:
                for cache in caches:
                    cache.length = 700
                return decoder.step_rows([[17]] * len(caches), caches, [None] * len(caches))

            cases[f"step {rows}"] = step
        for name, run in cases.items():
            taken = alternating_ms(
                {kind: (lambda m=modules: use(m), run) for kind, modules in (("packed", packed), ("plain", plain))},
                repeats,
            )
            for kind, ms in taken.items():
                figures[kind][name] = ms
    use(packed)
    return figures


def memory() -> dict[str, dict[str, int]]:
    """Resident MiB after loading the model and one forward, plain and packed; and what 600 prompt
    lengths add through the packed layer shapes, with oneDNN's caches as bounded and at their
    default of 1,024 entries. A fresh process each."""

    def probe(script: str, kind: str) -> int:
        run = subprocess.run([sys.executable, "-c", script, kind], check=True, capture_output=True, text=True)
        return int(run.stdout)

    return {
        "after loading and one forward": {kind: probe(MEMORY_PROBE, kind) for kind in ("plain", "packed")},
        "added by 600 prompt lengths": {kind: probe(SHAPES_PROBE, kind) for kind in ("bounded", "default caches")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"threads": args.threads, "products_ms": products(args.repeats)}
    print(json.dumps(report["products_ms"]), flush=True)
    report["rows_with_other_bits"] = differing_rows()
    report["attention"] = attention_bits(args.repeats)
    print(json.dumps({k: report[k] for k in ("rows_with_other_bits", "attention")}), flush=True)
    report["model_ms"] = model_steps(args.repeats)
    print(json.dumps(report["model_ms"]), flush=True)
    report["resident_mib"] = memory()
    print(json.dumps(report["resident_mib"]), flush=True)
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
