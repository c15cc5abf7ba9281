"""`sharedllm model prepare` (convert a model into the cache, e.g. a deployment's init step) and
`sharedllm model random` (a randomly initialised model of a named shape, for benchmarks)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sharedllm.common.config import DTYPE_CHOICES
from sharedllm.common.errors import InvalidInput
from sharedllm.common.model_shapes import SHAPES


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    model = sub.add_parser(name, help=help_text)
    commands = model.add_subparsers(dest="model_command", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="convert the model into the cache ($SHAREDLLM_CACHE_DIR) so that serving processes load it at once",
    )
    prepare.add_argument("--model", help="local HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    prepare.set_defaults(handler=run_prepare)
    random = commands.add_parser("random", help="write a randomly initialised model of a named shape (benchmarks)")
    random.add_argument("--shape", required=True, choices=sorted(SHAPES))
    random.add_argument("--out", type=Path, required=True, help="directory to write (must not exist)")
    random.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES[1:])
    random.add_argument("--seed", type=int, default=0)
    random.set_defaults(handler=run_random)


def run_prepare(args: argparse.Namespace) -> int:
    """Idempotent: a model already converted is found by its digest and left as it is."""
    # Loaded here, not with the module: `model --help` must not wait for torch and transformers.
    from sharedllm.common.model_loading import cache_dir, resolve_model_path

    path = resolve_model_path(args.model)
    print(f"{path} (cache: {cache_dir()})")
    return 0


def run_random(args: argparse.Namespace) -> int:
    from sharedllm.common.model_loading import dtype_from_name
    from sharedllm.common.random_model import write_random_model

    if args.out.exists():
        raise InvalidInput(f"{args.out} exists; choose a new directory")
    write_random_model(args.out, args.shape, dtype=dtype_from_name(args.dtype), seed=args.seed)
    print(f"wrote a random {args.shape} model ({args.dtype}) to {args.out}; use it with --model {args.out}")
    return 0
