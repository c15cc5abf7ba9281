"""What a training run is asked to do: plain values, checked where they are made, with no torch.

Apart from the loop (trainer.py) and the run around it (run.py), so that `sharedllm train` builds
and checks these from its flags, and shows its help, without loading the model's libraries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharedllm.common.config import TreeConfig
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.errors import InvalidInput

TRAIN_CORPORA: tuple[str, ...] = ("austen", "bible", "stdlib", "pydocs")
# The tree the shipped default adapter reads (8x compression); a run builds it unless told otherwise.
TRAIN_TREE = TreeConfig(chunk_size=512, pool_size=16)


def _check_at_least(least: int, **values: int) -> None:
    for name, value in values.items():
        if value < least:
            raise InvalidInput(f"{name} must be >= {least}, got {value}")


def _check_share(**values: float) -> None:
    for name, value in values.items():
        if not 0 <= value <= 1:
            raise InvalidInput(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class TrainSettings:
    """The loop's own settings: steps, schedule, accumulation, evaluations and checkpoints (0: never)."""

    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    accumulate: int = 1
    synthetic_fraction: float = 0.25
    split_noise: bool = True
    eval_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0
    max_minutes: float | None = None  # a wall-clock budget: stop early, checkpoint, export what was learned

    def __post_init__(self) -> None:
        _check_at_least(1, steps=self.steps, accumulate=self.accumulate)
        _check_at_least(0, warmup=self.warmup, eval_every=self.eval_every, checkpoint_every=self.checkpoint_every)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidInput(f"lr must be finite and > 0, got {self.lr}")
        _check_share(min_lr_ratio=self.min_lr_ratio, synthetic_fraction=self.synthetic_fraction)
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise InvalidInput(f"max_minutes must be finite and > 0, got {self.max_minutes}")


@dataclass(frozen=True)
class RunSettings:
    """One run around the loop: the model and adapter it starts from, the data it reads, where it writes.

    tree_changes: the TreeConfig fields asked for; the others are init_adapter's (its weights then
    fine-tune to read that tree, same M only), else TRAIN_TREE's. evidence: the excerpts of the
    evidence-shaped share of the examples (evidence_fraction; 0: none). command: the command line
    the exported adapter's provenance records.
    """

    run_dir: Path  # checkpoints, log.jsonl and the final adapter; a checkpoint there is resumed
    data_dir: Path
    model: str | None = None
    device: str | None = None  # None: this process's GPU (torchrun's LOCAL_RANK) if there is one, else the CPU
    init_adapter: str | Path | None = None  # a trained adapter file or a shipped adapter's name
    tree_changes: Mapping[str, Any] = field(default_factory=dict)
    out: Path | None = None  # also write the final adapter here
    corpora: tuple[str, ...] = TRAIN_CORPORA  # those fetched are read
    context_chunks: int = 4  # chunks compressed per example
    decoder_tokens: int = 256
    evidence_fraction: float = 0.0
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)
    eval_examples: int = 16
    train: TrainSettings = field(default_factory=TrainSettings)
    command: str = ""

    def __post_init__(self) -> None:
        _check_at_least(1, context_chunks=self.context_chunks, decoder_tokens=self.decoder_tokens)
        _check_at_least(0, eval_examples=self.eval_examples)
        _check_share(evidence_fraction=self.evidence_fraction)
