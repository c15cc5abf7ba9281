"""`sharedllm train`: train an injection adapter on the fetched corpora (resumable)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sharedllm.cli.options import TreeArguments, add_data_dir_argument
from sharedllm.common.config import TreeConfig
from sharedllm.common.data.corpora import read_manifest
from sharedllm.common.data.shards import SpanSampler, load_shards
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.errors import InvalidInput
from sharedllm.common.training.examples import (
    QUERY_TOKENS,
    Excerpts,
    LanguageModelling,
    SyntheticQuestions,
    fixed_lm_examples,
)
from sharedllm.common.training.trainer import FINAL_ADAPTER, Trainer, TrainSettings

TRAIN_CORPORA = ("austen", "bible", "stdlib", "pydocs")


# The tree the shipped default adapter reads (8x compression); `train` builds it unless told otherwise.
TRAIN_TREE = TreeConfig(chunk_size=512, pool_size=16)
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
    for flag in ("synthetic_fraction", "evidence_fraction"):
        if not (0 <= getattr(args, flag) <= 1):
            raise InvalidInput(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise InvalidInput(f"--max-minutes must be positive, got {args.max_minutes}")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if args.init_adapter is None:
        initial = None
        config = TREE.from_args(args)
        engine = Engine.load(args.model, None, device, tree_config=config)
    else:
        engine = Engine.load(args.model, args.init_adapter, device)  # checks the adapter's base model
        initial = engine.adapter
        config = TREE.from_args(args, initial.config)
        if config != initial.config:  # the same weights, fine-tuned to read differently built trees
            engine = Engine(engine.loaded, initial.retargeted(config))
    read_manifest(args.data_dir)  # a clear error when `sharedllm data fetch` has not run
    context_tokens = args.context_chunks * config.chunk_size
    span = context_tokens + args.decoder_tokens
    if span > engine.window:
        raise InvalidInput(f"context + decoder tokens ({span}) exceed the model window ({engine.window})")
    tokenizer = engine.tokenizer
    available = {e.corpus for e in read_manifest(args.data_dir)}
    corpora = [c for c in args.corpora if c in available]
    train = load_shards(args.data_dir, "train", tokenizer, corpora)
    heldout = load_shards(args.data_dir, "heldout", tokenizer, corpora)
    excerpts = None
    if args.evidence_fraction > 0:
        evidence = EvidenceSettings(tokens=args.evidence_tokens)
        evidence.validate()
        if evidence.tokens + args.decoder_tokens + QUERY_TOKENS > engine.window:
            raise InvalidInput(f"--evidence-tokens + --decoder-tokens exceed the model window ({engine.window})")
        excerpts = Excerpts(tokenizer, evidence, args.evidence_fraction, seed=args.seed + 31 * rank)
    lm = LanguageModelling(SpanSampler(train, span, seed=args.seed + 17 * rank), context_tokens, excerpts)
    synthetic = None
    if args.synthetic_fraction > 0:
        filler_doc = max(train.documents, key=lambda d: d.length if d.corpus in ("austen", "bible") else 0)
        filler_text = tokenizer.decode(train.tokens(filler_doc)[:200_000].tolist())
        eos = (
            tokenizer.convert_tokens_to_ids("<|im_end|>")
            if "<|im_end|>" in tokenizer.get_vocab()
            else (tokenizer.eos_token_id)
        )
        synthetic = SyntheticQuestions(
            tokenizer, filler_text, context_tokens, engine.prompt_ids, eos, seed=args.seed + rank, excerpts=excerpts
        )
    eval_set = fixed_lm_examples(SpanSampler(heldout, span, seed=12345), context_tokens, args.eval_examples)
    settings = TrainSettings(
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
    )
    provenance = {
        "corpora": corpora,
        "context_tokens": context_tokens,
        "decoder_tokens": args.decoder_tokens,
        "evidence_fraction": args.evidence_fraction,
        "evidence_tokens": args.evidence_tokens if args.evidence_fraction > 0 else 0,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "device": str(engine.body.device),
        "dtype": str(engine.body.dtype),
    }
    if initial is not None:
        provenance["initialised_from"] = initial.fingerprint()
        if initial.config != config:
            provenance["initialised_from_tree_config"] = initial.config.to_dict()
    trainer = Trainer(engine, settings, args.run_dir, (lm, synthetic), eval_set, provenance)
    final = trainer.train()
    command = "sharedllm " + shlex.join(sys.argv[1:])
    trainer.export(args.run_dir / FINAL_ADAPTER, command, final)
    if args.out and rank == 0:
        trainer.export(args.out, command, final)
    if rank == 0:
        print(f"trained {trainer.step} steps; held-out loss: {final}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
