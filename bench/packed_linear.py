"""The base model's linears packed for oneDNN against plain `F.linear` (MKL), on the CPU.

    python bench/packed_linear.py --json bench/results/concurrency/packed-linear.json

The facts behind common/kernels/packed_linear.py and the scheduler's exactness, in one run:
1. products of M rows by a stack of weights shaped as the default model's 30 layers (425 MB,
   so they come from memory as in a decode step, not from cache) and by its head, plain and
   packed (median of 5 passes);
2. which row counts give row 0 other bits than a product of one row, plain and packed;
3. attention (the CPU's scaled_dot_product_attention): whether a prompt's queries get the same
   bits read whole, cut into pieces, and as a single query; how far a padded batch moves a row;
4. the default model itself: a decode step of 1, 8 and 16 rows (700-token caches) and a
   600-token prompt, with its linears packed and then unpacked again (the same weights);
5. the resident memory of a process that loaded the model and ran it, packed and plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sharedllm.benchmark.report import write_json
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


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


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
    """Row counts whose product gives row 0 other bits than a product of that row alone."""
    weight = torch.randn(MLP, HIDDEN) * 0.02
    packed = packed_of(weight)
    x = torch.randn(600, HIDDEN)
    counts = [*range(1, 41), 64, 512, 600]
    found = {}
    for name, product in (("plain", lambda rows: F.linear(rows, weight)), ("packed", packed)):
        alone = product(x[:1])
        found[name] = [m for m in counts if not torch.equal(product(x[:m])[:1], alone)]
    return found


def attention_bits() -> dict[str, object]:
    """A 600-token prompt's attention read whole against read in pieces; one padded row."""
    q = torch.randn(1, HEADS, 600, HEAD_DIM)
    k, v = torch.randn(1, KV_HEADS, 600, HEAD_DIM), torch.randn(1, KV_HEADS, 600, HEAD_DIM)

    def read(start: int, end: int) -> torch.Tensor:
        mask = torch.ones(end - start, end, dtype=torch.bool).tril(start)
        return F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask, enable_gqa=True
        )

    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    cuts = {
        f"{s}-{e}": torch.equal(read(s, e), whole[:, :, s:e])
        for s, e in ((64, 600), (100, 600), (512, 600), (598, 600), (599, 600))
    }
    qp = torch.randn(4, HEADS, 1, HEAD_DIM)
    kp, vp = torch.randn(4, KV_HEADS, 650, HEAD_DIM), torch.randn(4, KV_HEADS, 650, HEAD_DIM)
    mask = torch.zeros(4, 1, 1, 650, dtype=torch.bool)
    mask[..., :600] = True
    batched = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)[2]
    alone = F.scaled_dot_product_attention(qp[2:3], kp[2:3, :, :600], vp[2:3, :, :600], enable_gqa=True)[0]
    return {"same bits as whole, by piece": cuts, "padded batch shift": float((batched - alone).abs().max())}


def unpack(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.to_linear())


def model_steps(repeats: int) -> dict[str, dict[str, float]]:
    from sharedllm.common.engine.engine import Engine

    engine = Engine.load(device="cpu")
    decoder = engine.decoder
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 40000, (600,), generator=generator).tolist()

    def timings() -> dict[str, float]:
        figures = {}
        with torch.inference_mode():
            figures["prompt 600"] = median_ms(
                lambda: decoder.step_rows([prompt], [engine.body.new_cache(600)], [None]), 3
            )
            for rows in (1, 8, 16):
                caches = []
                for _ in range(rows):
                    caches.append(engine.body.new_cache(700 + repeats + 2))
                    decoder.step_rows([prompt + prompt[:100]], caches[-1:], [None])
                figures[f"step {rows}"] = median_ms(
                    lambda c=caches: decoder.step_rows([[17]] * len(c), c, [None] * len(c)), repeats
                )
        return figures

    packed = timings()
    unpack(engine.loaded.model)
    return {"packed": packed, "plain": timings()}


def memory() -> dict[str, int]:
    """Resident MiB after loading the model and one forward, in a fresh process each."""
    return {
        kind: int(
            subprocess.run(
                [sys.executable, "-c", MEMORY_PROBE, kind], check=True, capture_output=True, text=True
            ).stdout
        )
        for kind in ("plain", "packed")
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
    report["attention"] = attention_bits()
    print(json.dumps({k: report[k] for k in ("rows_with_other_bits", "attention")}), flush=True)
    report["model_ms"] = model_steps(args.repeats)
    print(json.dumps(report["model_ms"]), flush=True)
    report["resident_mib"] = memory()
    print(json.dumps(report["resident_mib"]), flush=True)
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
