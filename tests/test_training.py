"""Training on the tiny model: gradients reach only the adapter, loss falls, resume works,
and two processes (gloo) train one adapter together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sharedllm.common.config import TreeConfig
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.evidence import EXCERPTS_HEADER
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.training.examples import (
    QUERY_TOKENS,
    Example,
    Excerpts,
    LanguageModelling,
    SyntheticQuestions,
)
from sharedllm.common.training.settings import TrainSettings
from sharedllm.common.training.trainer import Trainer, example_loss

TREE = ["--layers", "2", "--chunk-size", "64", "--depth", "2", "--pool-size", "4"]
SMALL_RUN = [
    "--context-chunks",
    "2",
    "--decoder-tokens",
    "32",
    "--eval-every",
    "2",
    "--eval-examples",
    "1",
    "--checkpoint-every",
    "1",
    "--warmup",
    "1",
    "--synthetic-fraction",
    "0.5",
]


@pytest.fixture(scope="module")
def bible_data(tmp_path_factory) -> Path:
    from sharedllm.common.data.corpora import fetch

    directory = tmp_path_factory.mktemp("data")
    fetch(directory, corpora=("bible",))
    return directory


def run_train(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), "-m", "sharedllm", "train", *args]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_only_the_adapter_learns_and_loss_falls(tiny_model_dir):
    engine = Engine.load(
        str(tiny_model_dir), tree_config=TreeConfig(n_layers=2, chunk_size=64, depth=2, pool_size=4), device="cpu"
    )
    g = torch.Generator().manual_seed(0)
    example = Example(
        torch.randint(100, 5000, (256,), generator=g).tolist(),
        torch.randint(100, 5000, (48,), generator=g).tolist(),
        1,
        None,
    )
    base_before = [p.clone() for p in engine.loaded.model.parameters()]
    trainer = Trainer(
        engine,
        TrainSettings(steps=25, lr=3e-2, warmup=1, eval_every=0, checkpoint_every=0),
        Path("/nonexistent-unused"),
        (lambda: example, None),
        [],
        {},
    )
    with torch.no_grad():
        before = float(example_loss(engine, example)[0])
    trainer.train()
    with torch.no_grad():
        after = float(example_loss(engine, example)[0])
    assert after < before * 0.9
    assert all(torch.equal(a, b) for a, b in zip(base_before, engine.loaded.model.parameters(), strict=True))
    assert any(block.o_proj.weight.abs().sum() > 0 for block in engine.adapter.blocks)


def test_a_time_budget_anneals_the_schedule_by_the_deadline(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), tree_config=TreeConfig(n_layers=2, chunk_size=64), device="cpu")
    settings = TrainSettings(steps=1000, lr=1e-3, warmup=0, min_lr_ratio=0.1, max_minutes=1.0)
    trainer = Trainer(engine, settings, Path("/nonexistent-unused"), (None, None), [], {})
    assert trainer.lr_at(0, elapsed_s=0) == pytest.approx(1e-3)
    assert trainer.lr_at(0, elapsed_s=30) == pytest.approx(trainer.lr_at(500))  # half the time = half the steps
    assert trainer.lr_at(10, elapsed_s=60) == pytest.approx(1e-4)  # the deadline: fully annealed
    assert trainer.lr_at(1000, elapsed_s=1) == pytest.approx(1e-4)  # the steps ran out first
    trainer.start_progress = 0.5  # resumed where an earlier budget left the schedule: no warming up again
    assert trainer.lr_at(10, elapsed_s=0) == pytest.approx(trainer.lr_at(500))
    assert trainer.lr_at(10, elapsed_s=30) == pytest.approx(trainer.lr_at(750))


def small_run(model_dir: Path, data_dir: Path, run_dir: Path, tree: bool = True) -> list[str]:
    """Arguments of a tiny training run on the Bible corpus (tree: with the tiny tree's flags)."""
    return [
        "--model",
        str(model_dir),
        "--data-dir",
        str(data_dir),
        "--run-dir",
        str(run_dir),
        "--corpora",
        "bible",
        *(TREE if tree else []),
        *SMALL_RUN,
    ]


def test_evidence_shaped_examples_put_excerpts_before_the_question_and_shield_them(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), tree_config=TreeConfig(2, 64, 2, 4), device="cpu")
    tokenizer = engine.tokenizer
    excerpts = Excerpts(tokenizer, EvidenceSettings(tokens=96, passage_tokens=16), fraction=1.0, seed=0)
    filler = "The river ran past the mill and the miller counted his sacks of grain. " * 200
    questions = SyntheticQuestions(tokenizer, filler, 512, engine.prompt_ids, 0, seed=3, excerpts=excerpts)
    for _ in range(3):
        example = questions()
        text = tokenizer.decode(example.decoder[: example.scored_from])
        assert EXCERPTS_HEADER in text and len(example.decoder) - example.scored_from >= 2  # answer + EOS
        (start, end), (after, length) = example.shielded  # as Engine.plan: only the question reads the tree
        assert start == 0 and EXCERPTS_HEADER in tokenizer.decode(example.decoder[start:end])
        assert example.decoder[end:after] == example.query
        assert after < example.scored_from and length == len(example.decoder)  # nor the answer (served default)
        assert example_loss(engine, example)[1] == len(example.decoder) - example.scored_from

    class OneSpan:  # the sampler's interface over one fixed span of the filler
        def sample(self, count: int) -> list[torch.Tensor]:
            return [torch.tensor(tokenizer(filler)["input_ids"][: 256 + 128])]

    lm = LanguageModelling(OneSpan(), 256, excerpts)()
    (start, end), scored = lm.shielded
    assert start == 0 and end > 0 and scored == (lm.scored_from, len(lm.decoder))
    assert lm.scored_from == end + QUERY_TOKENS and len(lm.decoder) == end + 128


def test_train_resume_and_export(tiny_model_dir, bible_data, tmp_path):
    run = tmp_path / "run"
    common = small_run(tiny_model_dir, bible_data, run)
    run_train(*common, "--steps", "2")
    run_train(*common, "--steps", "4")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    starts = [r for r in log if r.get("event") == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == 2
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    sidecar = json.loads((run / "adapter.safetensors.json").read_text())
    provenance = sidecar["provenance"]
    assert provenance["trained"] and provenance["steps"] == 4 and provenance["corpora"] == ["bible"]
    assert set(provenance["heldout_eval"]) >= {"window_alone", "full_attention", "sharedllm", "gap_closed"}
    # Every evaluation of both invocations, read back from the log: steps 2 (first run) and 4.
    history = provenance["heldout_eval_history"]
    gap = provenance["heldout_eval"]["gap_closed"]  # None when the tiny model's context gains nothing
    assert list(history) == ["2", "4"] and history["4"] == (None if gap is None else round(gap, 4))
    engine = Engine.load(str(tiny_model_dir), adapter=run / "adapter.safetensors", device="cpu")
    assert engine.trained and engine.adapter.config.chunk_size == 64

    # Fine-tuning from that adapter under a wall-clock budget that one step already spends.
    tuned = tmp_path / "tuned"
    # No tree flags: the adapter's own tree (C=64, P=4), not train's default one.
    tuned_args = [
        *small_run(tiny_model_dir, bible_data, tuned, tree=False),
        "--init-adapter",
        str(run / "adapter.safetensors"),
    ]
    evidence = ["--evidence-fraction", "1", "--evidence-tokens", "64"]  # every example evidence-shaped
    run_train(*tuned_args, *evidence, "--steps", "50", "--max-minutes", "0.0001")
    provenance = json.loads((tuned / "adapter.safetensors.json").read_text())["provenance"]
    assert (provenance["evidence_fraction"], provenance["evidence_tokens"]) == (1.0, 64)
    assert provenance["initialised_from"] == engine.adapter.fingerprint()
    assert provenance["steps"] == 1 and provenance["stopped_by_time_budget"]
    assert "initialised_from_tree_config" not in provenance
    assert (
        Engine.load(str(tiny_model_dir), adapter=tuned / "adapter.safetensors").adapter.config == engine.adapter.config
    )
    events = [json.loads(line).get("event") for line in (tuned / "log.jsonl").read_text().splitlines()]
    assert events[-1] == "time budget spent"

    # The same weights fine-tuned to read another tree (P=8): retargeted, and the sidecar says from what.
    retargeted = tmp_path / "retargeted"
    retarget_args = [
        *small_run(tiny_model_dir, bible_data, retargeted),
        "--init-adapter",
        str(run / "adapter.safetensors"),
    ]
    run_train(*retarget_args, "--pool-size", "8", "--steps", "1")
    sidecar = json.loads((retargeted / "adapter.safetensors.json").read_text())
    assert sidecar["tree_config"]["pool_size"] == 8
    assert sidecar["provenance"]["initialised_from"] == engine.adapter.fingerprint()
    assert sidecar["provenance"]["initialised_from_tree_config"] == engine.adapter.config.to_dict()
    assert sidecar["adapter_fingerprint"] != engine.adapter.fingerprint()
    # Resumed without --init-adapter: the checkpoint still knows where the weights came from.
    run_train(*small_run(tiny_model_dir, bible_data, retargeted), "--pool-size", "8", "--steps", "2")
    resumed = json.loads((retargeted / "adapter.safetensors.json").read_text())["provenance"]
    assert resumed["steps"] == 2 and resumed["initialised_from"] == engine.adapter.fingerprint()
    assert resumed["initialised_from_tree_config"] == engine.adapter.config.to_dict()

    other_m = subprocess.run(
        [
            sys.executable,
            "-m",
            "sharedllm",
            "train",
            *retarget_args,
            "--layers",
            "1",
            "--run-dir",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert other_m.returncode == 2 and "the weights fit only the same M" in other_m.stderr


def test_two_processes_train_one_adapter(tiny_model_dir, bible_data, tmp_path):
    run = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_train(
        *small_run(tiny_model_dir, bible_data, run),
        "--steps",
        "2",
        launcher=launcher,
        env={"OMP_NUM_THREADS": "1"},
    )
    sidecar = json.loads((run / "adapter.safetensors.json").read_text())
    assert sidecar["provenance"]["world_size"] == 2 and sidecar["provenance"]["steps"] == 2
    # A spent time budget stops both ranks at the same step (a rank left alone would hang in its all-reduce).
    run_train(
        *small_run(tiny_model_dir, bible_data, run),
        "--steps",
        "9",
        "--max-minutes",
        "0.0001",
        launcher=launcher,
        env={"OMP_NUM_THREADS": "1"},
    )
    sidecar = json.loads((run / "adapter.safetensors.json").read_text())
    assert sidecar["provenance"]["steps"] == 3 and sidecar["provenance"]["stopped_by_time_budget"]
