"""`sharedllm train`: train an injection adapter on the fetched corpora (resumable).

The flags become the library's RunSettings (checked as they are made, before torch loads); the
run itself is the library's (common/training/run.py), imported only when a run starts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sharedllm.cli.options import TreeArguments, add_data_dir_argument
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.training.settings import TRAIN_CORPORA, TRAIN_TREE, RunSettings, TrainSettings

TREE = TreeArguments(TRAIN_TREE)


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--run-dir", type=Path, required=True, help="checkpoints, log.jsonl and the final adapter")
    add_data_dir_argument(p)
    p.add_argument("--model", help="base model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device")
    p.add_argument("--out", type=Path, help="also write the final adapter here")
    p.add_argument(
        "--init-adapter",
        type=Path,
        help="start from this trained adapter's weights (a file or a shipped adapter's name) with a fresh "
        "optimizer; tree flags that differ from its tree fine-tune it to read that tree instead (same M only); "
        "a checkpoint in --run-dir still takes precedence",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        help="wall-clock budget: stop when it is spent, checkpoint and export what was learned",
    )
    TREE.add_arguments(
        p.add_argument_group("tree (unset flags: the --init-adapter's, else the shipped default's tree)")
    )
    p.add_argument("--context-chunks", type=int, default=4, help="chunks compressed per training example")
    p.add_argument("--decoder-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--synthetic-fraction", type=float, default=0.25)
    p.add_argument(
        "--evidence-fraction",
        type=float,
        default=0.0,
        help="share of examples given evidence-shaped windows: excerpts of the document chosen for the question "
        "(or the segment's opening) before it, shielded from the injection as served",
    )
    p.add_argument(
        "--evidence-tokens", type=int, default=EvidenceSettings().tokens, help="excerpt budget of those windows"
    )
    p.add_argument("--no-split-noise", action="store_true")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-examples", type=int, default=16)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpora", nargs="+", default=list(TRAIN_CORPORA))
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    settings = run_settings(args)
    from sharedllm.common.training.run import run_training  # torch: loaded once the flags are known good

    result = run_training(settings)
    if result.primary:
        print(f"trained {result.steps} steps; held-out loss: {result.heldout}")
    return 0


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The run the flags ask for."""
    return RunSettings(
        run_dir=args.run_dir,
        data_dir=args.data_dir,
        model=args.model,
        device=args.device,
        init_adapter=args.init_adapter,
        tree_changes=TREE.given(args),
        out=args.out,
        corpora=tuple(args.corpora),
        context_chunks=args.context_chunks,
        decoder_tokens=args.decoder_tokens,
        evidence_fraction=args.evidence_fraction,
        evidence=EvidenceSettings(tokens=args.evidence_tokens),
        eval_examples=args.eval_examples,
        train=TrainSettings(
            steps=args.steps,
            lr=args.lr,
            warmup=args.warmup,
            accumulate=args.accumulate,
            synthetic_fraction=args.synthetic_fraction,
            split_noise=not args.no_split_noise,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            max_minutes=args.max_minutes,
        ),
        command="sharedllm " + shlex.join(sys.argv[1:]),
    )
