"""Where a batched decode step's time goes, against this machine's memory and arithmetic roofs.

    python bench/step_roofline.py --json bench/results/concurrency/step-roofline.json

Why batching stops paying on a small CPU, from one run of the default model (fp32 unless --dtype, packed
linears, the scheduler's own `step_rows`):
1. the roofs: a streaming read of 512 MB (GB/s) and the product of two 4,096-square matrices
   (GFLOP/s), best of five;
2. decode steps of 1, 8 and 16 rows over --cache-tokens cached positions, with the compiled
   decode-attention kernel (kernels/decode_attention.py) and with torch's attention row by row,
   taking turns: the whole step, its attention alone (the same calls over the same caches) and
   the bytes a step must read (the weights once, every row's keys and values), as GB/s;
3. a --prompt-tokens prompt read in one piece, as GFLOP/s (against the fp32 product's roof, also
   with --dtype bfloat16);
4. what these parts give the load benchmark with distinct prompts (serving costs nothing here):
   N clients that each have a prompt read (P) and T tokens written need about N*P + T*s_N seconds
   of model time, one client P + T*s_1, so N clients make about N*(P + T*s_1) / (N*P + T*s_N)
   times one client's tokens per second;
5. 8K-token documents compressed at once by 1, 2 and 4 threads, each with its own OpenMP pool
   as the compressor service's workers run them: wall time and tokens per second.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from sharedllm.benchmark.report import write_json
from sharedllm.benchmark.timing import alternating_ms, median_ms
from sharedllm.common.engine.engine import Engine
from sharedllm.common.model_loading import dtype_from_name

ROWS = (1, 8, 16)
READ_BYTES = 512 << 20
PRODUCT_SIDE = 4096
ROOF_TRIES = 5


def roofs() -> dict[str, float]:
    """Best streaming-read bandwidth (GB/s) and fp32 matrix-product rate (GFLOP/s) of this machine."""
    data = torch.ones(READ_BYTES // 4)
    a, b = torch.randn(PRODUCT_SIDE, PRODUCT_SIDE), torch.randn(PRODUCT_SIDE, PRODUCT_SIDE)
    read_s = min(median_ms(data.sum, 1) for _ in range(ROOF_TRIES)) / 1000
    product_s = min(median_ms(lambda: a @ b, 1) for _ in range(ROOF_TRIES)) / 1000
    return {
        "read_gb_per_s": round(READ_BYTES / read_s / 1e9, 1),
        "fp32_gflop_per_s": round(2 * PRODUCT_SIDE**3 / product_s / 1e9, 1),
    }


def weight_bytes(engine: Engine) -> int:
    """Bytes of the linears a step reads once whatever its rows: every layer's and the head."""
    linears = [m for m in engine.body.layers.modules() if hasattr(m, "in_features")] + [engine.body.lm_head]
    return sum(m.in_features * m.out_features for m in linears) * engine.body.dtype.itemsize


def decode_steps(engine: Engine, cache_tokens: int, repeats: int, read_gb_per_s: float) -> dict[str, dict]:
    """Each row count's step and its attention alone, with the compiled kernel and with torch's
    attention row by row (the four taking turns), and the bytes a step reads."""
    body, decoder = engine.body, engine.decoder
    kernel = decoder.decode_kernel
    attentions = {"torch": None} if kernel is None else {"kernel": kernel, "torch": None}
    prompt = list(range(1000, 1000 + cache_tokens))
    weights = weight_bytes(engine)
    per_row_kv = body.n_layers * 2 * body.n_kv * (cache_tokens + 1) * body.head_dim * body.dtype.itemsize
    result = {}
    for rows in ROWS:
        caches = [body.new_cache(cache_tokens + 1) for _ in range(rows)]
        for cache in caches:
            decoder.step_rows([prompt], [cache], [None])
        queries = torch.randn(rows, body.n_heads, body.head_dim, dtype=body.dtype)
        keys, values = [c.keys for c in caches], [c.values for c in caches]

        def setup(attention: ModuleType | None, caches: list = caches) -> Callable[[], None]:
            def use() -> None:
                decoder.decode_kernel = attention
                for cache in caches:
                    cache.length = cache_tokens

            return use

        def step(caches: list = caches, rows: int = rows) -> None:
            decoder.step_rows([[17]] * rows, caches, [None] * rows)

        def kernel_attention(keys: list = keys, values: list = values, queries: torch.Tensor = queries) -> None:
            for i in range(body.n_layers):
                scale = body.layers[i].self_attn.scaling
                kernel.decode_attention(queries, keys, values, [cache_tokens + 1] * len(keys), i, scale)

        def torch_attention(caches: list = caches, queries: torch.Tensor = queries) -> None:
            end = cache_tokens + 1
            for i in range(body.n_layers):
                for row, cache in enumerate(caches):
                    keys, values = cache.keys[i, :, :, :end], cache.values[i, :, :, :end]
                    body.attention_heads(i, queries[row : row + 1].unsqueeze(2), keys, values, cache_tokens)

        cases = {f"step, {name}": (setup(attention), step) for name, attention in attentions.items()}
        cases["attention, torch"] = (lambda: None, torch_attention)
        if kernel is not None:
            cases["attention, kernel"] = (lambda: None, kernel_attention)
        times = alternating_ms(cases, repeats)
        read = weights + rows * per_row_kv
        result[str(rows)] = {
            "ms": times,
            "bytes_read_mb": round(read / 1e6, 1),
            **{
                name: {
                    "attention_share": round(times[f"attention, {name}"] / times[f"step, {name}"], 2),
                    "gb_per_s": round(read / times[f"step, {name}"] / 1e6, 1),
                    "of_read_roof": round(read / times[f"step, {name}"] / 1e6 / read_gb_per_s, 2),
                    "tokens_per_s": round(rows / times[f"step, {name}"] * 1000, 1),
                }
                for name in attentions
            },
        }
        print(json.dumps({f"decode {rows}": result[str(rows)]}), flush=True)
    decoder.decode_kernel = kernel
    return result


def prompt_read(engine: Engine, tokens: int, repeats: int, gflop_per_s: float) -> dict[str, float]:
    """One prompt read in one piece: its time and its arithmetic rate."""
    body, decoder = engine.body, engine.decoder
    prompt = list(range(1000, 1000 + tokens))
    milliseconds = median_ms(lambda: decoder.step_rows([prompt], [body.new_cache(tokens)], [None]), repeats)
    layer_weights = weight_bytes(engine) // body.dtype.itemsize - body.lm_head.in_features * body.lm_head.out_features
    # Products with every layer's weights, causal attention (scores and weighted values), one head row.
    flops = 2 * layer_weights * tokens + 2 * body.n_layers * body.n_heads * body.head_dim * tokens * tokens
    flops += 2 * body.lm_head.in_features * body.lm_head.out_features
    rate = flops / milliseconds / 1e6
    return {
        "tokens": tokens,
        "ms": milliseconds,
        "gflop_per_s": round(rate, 1),
        "of_fp32_product_roof": round(rate / gflop_per_s, 2),
    }


def ratios_from_parts(prompt_ms: float, steps: dict[str, dict], new_tokens: int) -> dict[str, dict[str, float]]:
    """N clients with distinct prompts against one, in tokens/s, from the measured parts alone,
    for each attention the steps were timed with.

    An estimate, not a bound: a step that reads a prompt piece and decodes rows at once reads the
    weights once for both, which this sum does not credit, and serving costs nothing here."""
    names = [key.removeprefix("step, ") for key in steps["1"]["ms"] if key.startswith("step, ")]
    ratios = {}
    for name in names:
        one = prompt_ms + new_tokens * steps["1"]["ms"][f"step, {name}"]
        ratios[name] = {
            rows: round(int(rows) * one / (int(rows) * prompt_ms + new_tokens * step["ms"][f"step, {name}"]), 2)
            for rows, step in steps.items()
            if rows != "1"
        }
    return ratios


def compressions(document_tokens: int, counts: tuple[int, ...], dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Documents compressed at once, each in its own thread (its own OpenMP pool)."""
    engine = Engine.load(device="cpu", dtype=dtype, lower_only=True)
    ids = list(range(1000, 1000 + document_tokens))
    engine.compress(ids[:2048])
    result = {}
    for count in counts:
        seconds: list[float] = []

        def compress(seconds: list[float] = seconds) -> None:
            started = time.perf_counter()
            engine.compress(ids)
            seconds.append(time.perf_counter() - started)

        workers = [threading.Thread(target=compress) for _ in range(count)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - started
        result[str(count)] = {
            "wall_s": round(wall, 2),
            "slowest_s": round(max(seconds), 2),
            "tokens_per_s": round(count * document_tokens / wall),
        }
        print(json.dumps({f"compressions {count}": result[str(count)]}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cache-tokens", type=int, default=700, help="cached positions of every decoding row")
    parser.add_argument("--prompt-tokens", type=int, default=600)
    parser.add_argument("--new-tokens", type=int, default=256, help="T of the ratio from parts (the load benchmark's)")
    parser.add_argument("--document-tokens", type=int, default=8192)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the model's weights")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = dtype_from_name(args.dtype)
    report: dict[str, object] = {"dtype": args.dtype, "threads": args.threads, "cpus": os.cpu_count(), "roofs": roofs()}
    print(json.dumps(report), flush=True)
    engine = Engine.load(device="cpu", dtype=dtype)
    with torch.inference_mode():
        steps = decode_steps(engine, args.cache_tokens, args.repeats, report["roofs"]["read_gb_per_s"])
        prompt = prompt_read(engine, args.prompt_tokens, args.repeats, report["roofs"]["fp32_gflop_per_s"])
        print(json.dumps({"prompt": prompt}), flush=True)
        del engine
        report.update(
            cache_tokens=args.cache_tokens,
            decode=steps,
            prompt=prompt,
            new_tokens=args.new_tokens,
            ratio_from_parts=ratios_from_parts(prompt["ms"], steps, args.new_tokens),
            compressions=compressions(args.document_tokens, (1, 2, 4), dtype),
        )
    print(json.dumps({"ratio_from_parts": report["ratio_from_parts"]}), flush=True)
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
