"""One training run from its settings: the processes, the engine, the data, the loop, the export.

What `sharedllm train` runs once it has turned its flags into RunSettings, so that the command
line only reads arguments and reports, and a script or a test can start the same run in-process.
Under torchrun every process runs this; rank 0 alone writes checkpoints, logs and adapters.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sharedllm.common.data.corpora import read_manifest
from sharedllm.common.data.shards import SpanSampler, TokenShards, load_shards
from sharedllm.common.engine.adapter import InjectionAdapter
from sharedllm.common.engine.engine import Engine
from sharedllm.common.errors import InvalidInput
from sharedllm.common.training.examples import (
    QUERY_TOKENS,
    Example,
    Excerpts,
    LanguageModelling,
    SyntheticQuestions,
    fixed_lm_examples,
)
from sharedllm.common.training.settings import TRAIN_TREE, RunSettings
from sharedllm.common.training.trainer import FINAL_ADAPTER, Trainer

FILLER_TOKENS = 200_000  # of the longest prose document, where synthetic questions hide their facts
HELDOUT_SEED = 12345  # the held-out evaluation set is the same for every run and every rank


@dataclass(frozen=True)
class RunResult:
    steps: int  # where the run directory now stands (a resumed run counts its earlier steps)
    heldout: dict[str, Any]  # the exported weights' held-out evaluation (rank 0; {} with no held-out examples)
    primary: bool  # this process is rank 0: it wrote the adapter and reports


def run_training(settings: RunSettings) -> RunResult:
    """Train (resuming a checkpoint in run_dir) and export the adapter to run_dir and `out`."""
    rank = _join_processes()
    engine, initial = _engine(settings, _device(settings.device))
    sources, heldout, corpora, context_tokens = _data(settings, engine, rank)
    provenance = _provenance(settings, engine, initial, corpora, context_tokens)
    trainer = Trainer(engine, settings.train, settings.run_dir, sources, heldout, provenance)
    final = trainer.train()
    trainer.export(settings.run_dir / FINAL_ADAPTER, settings.command, final)
    if settings.out is not None:
        trainer.export(settings.out, settings.command, final)
    if dist.is_initialized():
        dist.destroy_process_group()
    return RunResult(trainer.step, final, rank == 0)


def _join_processes() -> int:
    """This process's rank; under torchrun (WORLD_SIZE > 1) it joins the process group first."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def _device(asked: str | None) -> str | None:
    """The device asked for; else, on a GPU machine, this process's own GPU (torchrun's LOCAL_RANK)."""
    if asked is None and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return asked


def _engine(settings: RunSettings, device: str | None) -> tuple[Engine, InjectionAdapter | None]:
    """The engine to train, and the trained adapter it starts from (None: a fresh one)."""
    if settings.init_adapter is None:
        tree = dataclasses.replace(TRAIN_TREE, **settings.tree_changes)
        return Engine.load(settings.model, None, device, tree_config=tree), None
    engine = Engine.load(settings.model, settings.init_adapter, device)  # checks the adapter's base model
    initial = engine.adapter
    tree = dataclasses.replace(initial.config, **settings.tree_changes)
    if tree != initial.config:  # the same weights, fine-tuned to read differently built trees
        engine = Engine(engine.loaded, initial.retargeted(tree))
    return engine, initial


def _data(
    settings: RunSettings, engine: Engine, rank: int
) -> tuple[tuple[LanguageModelling, SyntheticQuestions | None], list[Example], list[str], int]:
    """The training sources (language modelling, synthetic questions), the fixed held-out set, the
    corpora read and the context tokens per example; each rank samples its own examples."""
    available = {e.corpus for e in read_manifest(settings.data_dir)}  # a clear error before `data fetch` ran
    context_tokens = settings.context_chunks * engine.adapter.config.chunk_size
    span = context_tokens + settings.decoder_tokens
    if span > engine.window:
        raise InvalidInput(f"context + decoder tokens ({span}) exceed the model window ({engine.window})")
    excerpts = _excerpts(settings, engine, rank)
    corpora = [c for c in settings.corpora if c in available]
    train = load_shards(settings.data_dir, "train", engine.tokenizer, corpora)
    heldout = load_shards(settings.data_dir, "heldout", engine.tokenizer, corpora)
    seed = settings.train.seed
    lm = LanguageModelling(SpanSampler(train, span, seed=seed + 17 * rank), context_tokens, excerpts)
    synthetic = None
    if settings.train.synthetic_fraction > 0:
        synthetic = _synthetic_questions(engine, train, context_tokens, excerpts, seed + rank)
    eval_set = fixed_lm_examples(SpanSampler(heldout, span, seed=HELDOUT_SEED), context_tokens, settings.eval_examples)
    return (lm, synthetic), eval_set, corpora, context_tokens


def _excerpts(settings: RunSettings, engine: Engine, rank: int) -> Excerpts | None:
    """What makes the evidence-shaped share of the examples (None: no such share)."""
    if settings.evidence_fraction == 0:
        return None
    if settings.evidence.tokens + settings.decoder_tokens + QUERY_TOKENS > engine.window:
        raise InvalidInput(f"--evidence-tokens + --decoder-tokens exceed the model window ({engine.window})")
    seed = settings.train.seed + 31 * rank
    return Excerpts(engine.tokenizer, settings.evidence, settings.evidence_fraction, seed=seed)


def _synthetic_questions(
    engine: Engine, train: TokenShards, context_tokens: int, excerpts: Excerpts | None, seed: int
) -> SyntheticQuestions:
    """Passkeys, needles and records hidden in the longest Austen or Bible text of the training split."""
    tokenizer = engine.tokenizer
    filler = max(train.documents, key=lambda d: d.length if d.corpus in ("austen", "bible") else 0)
    filler_text = tokenizer.decode(train.tokens(filler)[:FILLER_TOKENS].tolist())
    vocabulary = tokenizer.get_vocab()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in vocabulary else tokenizer.eos_token_id
    return SyntheticQuestions(
        tokenizer, filler_text, context_tokens, engine.prompt_ids, eos, seed=seed, excerpts=excerpts
    )


def _provenance(
    settings: RunSettings, engine: Engine, initial: InjectionAdapter | None, corpora: list[str], context_tokens: int
) -> dict[str, Any]:
    """What the exported adapter records about how it was trained (before training: a retargeted
    adapter shares its weights with `initial`, whose fingerprint must be read untrained)."""
    provenance: dict[str, Any] = {
        "corpora": corpora,
        "context_tokens": context_tokens,
        "decoder_tokens": settings.decoder_tokens,
        "evidence_fraction": settings.evidence_fraction,
        "evidence_tokens": settings.evidence.tokens if settings.evidence_fraction > 0 else 0,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "device": str(engine.body.device),
        "dtype": str(engine.body.dtype),
    }
    if initial is not None:
        provenance["initialised_from"] = initial.fingerprint()
        if initial.config != engine.adapter.config:
            provenance["initialised_from_tree_config"] = initial.config.to_dict()
    return provenance
