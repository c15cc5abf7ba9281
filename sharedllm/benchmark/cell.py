"""One measurement cell: one method, one document length, one repetition, in a process of its own.

    python -m sharedllm.benchmark.cell --method full --length 8192 --tokens doc.npy --repeat 0

prints one JSON object. Why a process per cell: peak memory is then the cell's own, never a
previous cell's, and no method inherits another's warm caches or fragmented heap.

Every method answers the same two calls (measure.py), so one sequence measures them all.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from sharedllm.benchmark.measure import GRPC_METHOD, LOCAL_METHODS, measure, warm_up


def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    tokens = np.load(args.tokens)[: args.length].tolist()
    if len(tokens) < args.length:
        raise ValueError(f"{args.tokens} holds {len(tokens)} tokens; the cell needs {args.length}")
    cell: dict[str, Any] = {"method": args.method, "length": args.length, "repeat": args.repeat}
    if args.method == GRPC_METHOD:
        from sharedllm.benchmark.remote import RemoteSharedLLM

        api_key = os.environ.get("SHAREDLLM_API_KEY")
        with RemoteSharedLLM(args.compressor, args.decoder, args.max_new_tokens, api_key) as remote:
            warm_up(remote, tokens)
            cell["metrics"] = measure(remote, tokens)
        return cell
    from sharedllm.benchmark.local import measure_local

    return {**cell, **measure_local(args, tokens)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sharedllm.benchmark.cell", description=__doc__.split("\n")[0])
    parser.add_argument("--method", required=True, choices=(*LOCAL_METHODS, GRPC_METHOD))
    parser.add_argument("--length", type=int, required=True, help="document tokens")
    parser.add_argument("--tokens", type=Path, required=True, help=".npy of the document's token ids")
    parser.add_argument("--repeat", type=int, default=0, help="repetition index (recorded; orders paired steps)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--model")
    parser.add_argument("--adapter")
    parser.add_argument("--device")
    parser.add_argument("--dtype", default="auto", help="checked where the model loads (model_loading.dtype_from_name)")
    parser.add_argument("--compressor", help="HOST:PORT of the compressor service (--method grpc)")
    parser.add_argument("--decoder", help="HOST:PORT of the decoder service (--method grpc)")
    return parser


def main() -> None:
    print(json.dumps(run_cell(build_parser().parse_args())))


if __name__ == "__main__":
    main()
