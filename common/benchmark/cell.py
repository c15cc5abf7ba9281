"""One measurement cell: one method, one document length, one repetition, in a process of its own.

    python -m common.benchmark.cell --method full --length 8192 --tokens doc.npy --repeat 0

prints one JSON object. Why a process per cell: peak memory is then the cell's own, never a
previous cell's, and no method inherits another's warm caches or fragmented heap.

Every method answers the same two calls, so one sequence measures them all:
`store(tokens)` builds what later questions read (SharedLLM: the compressed context in a
store; full attention: the document's KV cache; StreamingLLM: its bounded sink cache), and
`ask(question)` answers from it, leaving it as it was. First-question time to first token is
store + ask; the repeat question is a second ask on the same stored context.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.benchmark.workload import QUESTIONS

LOCAL_METHODS: tuple[str, ...] = ("sharedllm", "full", "streaming")
GRPC_METHOD = "grpc"  # SharedLLM through the gRPC services and Redis, against embedded `sharedllm`
WARM_UP_TOKENS = 256


@dataclass(frozen=True)
class Stored:
    seconds: float
    stored_bytes: int
    details: dict[str, float] = field(default_factory=dict)  # parts of `seconds`, by name


@dataclass(frozen=True)
class Answer:
    ttft_s: float  # from the question's arrival to its first token
    decode_s: float  # from the first token to the last
    tokens: int  # tokens generated (an end-of-sequence token is not counted)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token; None when fewer than two tokens came."""
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else None


class Method(Protocol):
    def store(self, tokens: list[int]) -> Stored: ...

    def ask(self, question: str) -> Answer: ...


def measure(method: Method, tokens: list[int]) -> dict[str, Any]:
    """Store the document, then ask the first and the repeat question; the cell's metrics."""
    stored = method.store(tokens)
    first = method.ask(QUESTIONS[0])
    repeat = method.ask(QUESTIONS[1])
    return {
        "compress_s": stored.seconds,
        **stored.details,
        "first_ttft_s": stored.seconds + first.ttft_s,
        "repeat_ttft_s": repeat.ttft_s,
        "decode_tokens_per_s": first.tokens_per_s,
        "decoded_tokens": first.tokens,
        "stored_bytes": stored.stored_bytes,
    }


def warm_up(method: Method, tokens: list[int]) -> None:
    """Run every operation once on a short prefix, so one-time costs (lazy initialisation, first
    allocations, kernel selection, a channel's connection) stay out of the measurement."""
    method.store(tokens[:WARM_UP_TOKENS])
    method.ask(QUESTIONS[0])


def run_cell(args: argparse.Namespace) -> dict[str, Any]:
    tokens = np.load(args.tokens)[: args.length].tolist()
    if len(tokens) < args.length:
        raise ValueError(f"{args.tokens} holds {len(tokens)} tokens; the cell needs {args.length}")
    cell: dict[str, Any] = {"method": args.method, "length": args.length, "repeat": args.repeat}
    if args.method == GRPC_METHOD:
        from common.benchmark.remote import RemoteSharedLLM

        api_key = os.environ.get("SHAREDLLM_API_KEY")
        with RemoteSharedLLM(args.compressor, args.decoder, args.max_new_tokens, api_key) as remote:
            warm_up(remote, tokens)
            cell["metrics"] = measure(remote, tokens)
        return cell
    from common.benchmark.local import measure_local

    return {**cell, **measure_local(args, tokens)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m common.benchmark.cell", description=__doc__.split("\n")[0])
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
