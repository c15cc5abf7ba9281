"""How the CPU's kernels treat a row by how many rows share its product: the facts behind
Decoder.step_rows padding packed steps to 4 tokens, and behind attention staying row by row.

    python bench/row_products.py --json bench/results/concurrency/row-products.json

With the default model's shapes in fp32 (hidden 576, MLP 1536, vocabulary 49,152; 9 query heads
over 3 key/value heads of 64): the time of a product of M rows by the MLP's and the head's
weights (median of 40 and 10), whether row 0's result has the same bits as in a product of 4 rows,
and how far a row's attention output moves when it is computed in a padded batch of 4 rows
(keys masked past its own length) rather than alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sharedllm.benchmark.report import write_json

HIDDEN, MLP, VOCAB = 576, 1536, 49152
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def product_ms(weight: torch.Tensor, rows: int, repeats: int) -> float:
    x = torch.randn(rows, HIDDEN)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        F.linear(x, weight)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def attention_shift(length: int, padded_to: int) -> float:
    """Largest difference of one row's attention output alone and in a padded batch of 4."""
    q = torch.randn(4, HEADS, 1, HEAD_DIM)
    k, v = torch.randn(4, KV_HEADS, padded_to, HEAD_DIM), torch.randn(4, KV_HEADS, padded_to, HEAD_DIM)
    mask = torch.zeros(4, 1, 1, padded_to, dtype=torch.bool)
    mask[..., :length] = True
    batched = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)[2]
    alone = F.scaled_dot_product_attention(q[2:3], k[2:3, :, :length], v[2:3, :, :length], enable_gqa=True)[0]
    return float((batched - alone).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = {"mlp": torch.randn(MLP, HIDDEN), "head": torch.randn(VOCAB, HIDDEN)}
    times = {
        name: {rows: product_ms(w, rows, 40 if name == "mlp" else 10) for rows in range(1, 13)}
        for name, w in weights.items()
    }
    x = torch.randn(40, HIDDEN)
    same_bits = {
        name: {rows: torch.equal(F.linear(x[:rows], w)[:1], F.linear(x[:4], w)[:1]) for rows in range(1, 41)}
        for name, w in weights.items()
    }
    shifts = {f"{n} keys in {p}": attention_shift(n, p) for n, p in ((600, 600), (600, 650), (777, 1100))}
    report = {"threads": args.threads, "product_ms": times, "same_bits_as_4_rows": same_bits, "attention_shift": shifts}
    print(json.dumps({"product_ms": times, "attention_shift": shifts}))
    print(
        "rows whose result differs from 4 rows':",
        {n: [r for r, same in s.items() if not same] for n, s in same_bits.items()},
    )
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
