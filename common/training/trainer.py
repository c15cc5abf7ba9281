"""The training loop: AdamW, warm-up + cosine, accumulation, checkpoints, held-out evaluation.

Only the adapter's parameters train; the base model (and so the lower model, which is the
same tensors) is frozen and context trees are built without gradients. Data parallelism
across processes (torchrun) averages gradients with an all-reduce after each step's
backward passes, which is what DistributedDataParallel does for a module it wraps; the
adapter's blocks run from hooks inside the engine's layer loop, so they are reduced directly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.tree import ContextTree
from sharedllm.common.errors import InvalidInput
from sharedllm.common.training.examples import Example
from sharedllm.common.training.settings import TrainSettings

CHECKPOINT = "checkpoint.pt"
LOG_FILE = "log.jsonl"
FINAL_ADAPTER = "adapter.safetensors"


def gap_closed(window_alone: float, sharedllm: float, full_attention: float) -> float | None:
    """The share of full attention's gain over the decoder segment alone that SharedLLM recovers
    (in loss); None when there is no gain to recover, so a ratio over nothing is never reported."""
    gap = window_alone - full_attention
    return (window_alone - sharedllm) / gap if gap > 0 else None


def example_loss(
    engine: Engine,
    example: Example,
    inject: bool = True,
    full_context: bool = False,
    noise: torch.Generator | None = None,
    tree: ContextTree | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the scored decoder tokens, and how many were scored.

    inject=False is the window-alone baseline; full_context=True puts the document in the
    base model's window instead (the full-attention baseline); both score the same tokens.
    tree: the document already compressed (a caller that needed it before, e.g. to rank excerpts).
    """
    prefix = example.document if full_context else []
    if not inject or full_context:
        tree = None
    elif tree is None:
        tree = engine.compressor.compress(example.document, split_noise=noise)
    ids = prefix + example.decoder
    first = len(prefix) + example.scored_from  # index of the first scored token
    shielded = () if full_context else example.shielded  # the base window reads no injection anyway
    logits = engine.logits(ids, tree, example.query, from_position=first - 1, shielded=shielded)[:-1].float()
    targets = torch.tensor(ids[first:], device=logits.device)
    return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())


def mean_loss(engine: Engine, examples: list[Example], **mode) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            loss, n = example_loss(engine, example, **mode)
            total += float(loss)
            count += n
    return total / max(count, 1)


class Trainer:
    def __init__(
        self, engine: Engine, settings: TrainSettings, run_dir: Path, sources, heldout: list[Example], provenance: dict
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.sources = sources  # (language_modelling, synthetic or None)
        self.heldout = heldout
        self.provenance = provenance
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if engine.body.dtype != torch.float32:
            # fp32 master weights: bf16 cannot represent small AdamW updates; autocast runs
            # the arithmetic in the model's dtype (see `precision`).
            engine.adapter.float()
        self.params = list(engine.adapter.parameters())
        engine.adapter.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.95))
        self.step = 0
        self.baselines: dict[str, float] = {}
        self.stopped_by_budget = False
        self.progress = 0.0  # of the cosine schedule, as last applied (kept in checkpoints)
        self.start_progress = 0.0  # where this invocation's time budget starts annealing from

    def precision(self) -> contextlib.AbstractContextManager:
        body = self.engine.body
        if body.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(body.device.type, dtype=body.dtype)

    def schedule_progress(self, step: int, elapsed_s: float) -> float:
        """How far along the cosine is, in [0, 1]: by steps; under a time budget, by whichever of
        steps and this invocation's time is further along, the time part annealing from where the
        schedule stood when it started, so a run the budget stops has annealed and a resumed one
        never heats up again."""
        s = self.settings
        progress = (step - s.warmup) / max(1, s.steps - s.warmup)
        if s.max_minutes is not None:
            start = self.start_progress
            progress = max(progress, start + (1 - start) * elapsed_s / (60 * s.max_minutes))
        return min(max(progress, 0.0), 1.0)

    def lr_at(self, step: int, elapsed_s: float = 0.0) -> float:
        """Linear warm-up, then cosine to min_lr_ratio (see `schedule_progress`)."""
        s = self.settings
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        progress = self.schedule_progress(step, elapsed_s)
        return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    # ---- checkpoints ---------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """One file, replaced atomically: adapter, optimizer and step can never disagree."""
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "tree_config": self.engine.adapter.config.to_dict(),
            "adapter": {k: v.detach().cpu() for k, v in self.engine.adapter.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "baselines": self.baselines,
            "schedule_progress": self.progress,
            # Where the weights started: a resumed run exports it though it is not told again.
            "origin": {k: v for k, v in self.provenance.items() if k.startswith("initialised_from")},
        }
        tmp = self.run_dir / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / CHECKPOINT)

    def try_resume(self) -> bool:
        path = self.run_dir / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=True, map_location=self.engine.body.device)
        if state["tree_config"] != self.engine.adapter.config.to_dict():
            raise InvalidInput(
                f"{path} was trained with tree config {state['tree_config']}, this run asks for "
                f"{self.engine.adapter.config.to_dict()}; use another --run-dir"
            )
        self.engine.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.baselines = dict(state.get("baselines", {}))
        self.progress = float(state.get("schedule_progress", 0.0))
        for key, value in state.get("origin", {}).items():
            self.provenance.setdefault(key, value)
        return True

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    # ---- evaluation ----------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out loss of SharedLLM beside the window-alone and full-attention baselines."""
        with self.precision():
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        if not self.baselines and self.heldout:
            self.baselines = {
                "window_alone": mean_loss(self.engine, self.heldout, inject=False),
                "full_attention": mean_loss(self.engine, self.heldout, full_context=True),
            }
        result = dict(self.baselines)
        if self.heldout:
            result["sharedllm"] = mean_loss(self.engine, self.heldout)
            result["gap_closed"] = gap_closed(result["window_alone"], result["sharedllm"], result["full_attention"])
        return result

    def average_gradients(self) -> None:
        """One all-reduce of every gradient, zeros where a rank has none, so no rank waits alone."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def shared_elapsed(self, started: float) -> float:
        """Seconds since `started` by rank 0's clock, so every rank takes the same learning rate
        and stops at the same step under a time budget (only a budget makes time matter)."""
        elapsed = time.perf_counter() - started
        if self.settings.max_minutes is None or self.world == 1:
            return elapsed
        value = torch.tensor([elapsed], dtype=torch.float64, device=self.engine.body.device)
        dist.broadcast(value, src=0)  # on the gradients' device, which the backend serves
        return float(value.item())

    # ---- the loop --------------------------------------------------------------------

    def train(self) -> dict:
        s = self.settings
        resumed = self.try_resume()
        rng = random.Random(s.seed * 1_000_003 + self.step * 7919 + self.rank)
        noise = torch.Generator().manual_seed(s.seed + self.step + 1000 * self.rank)
        language_modelling, synthetic = self.sources
        for source in (language_modelling, synthetic):
            if hasattr(source, "reseed"):  # fresh data after a resume, distinct per rank
                source.reseed(s.seed * 1_000_003 + self.step * 7919 + self.rank * 104_729)
        self.log({"event": "start", "resumed": resumed, "step": self.step, "settings": asdict(s)})
        bar = tqdm(total=s.steps, initial=self.step, desc="train", disable=self.rank != 0, file=sys.stderr)
        started = time.perf_counter()
        last_eval: dict[str, float] = {}
        last_eval_step = -1
        first_step = self.step
        if s.max_minutes is not None:
            self.start_progress = max(self.progress, self.schedule_progress(self.step, 0.0))
        while self.step < s.steps:
            elapsed = self.shared_elapsed(started)
            if s.max_minutes is not None and self.step > first_step and elapsed >= 60 * s.max_minutes:
                self.stopped_by_budget = True
                self.log({"event": "time budget spent", "step": self.step, "max_minutes": s.max_minutes})
                break
            lr = self.lr_at(self.step, elapsed)
            self.progress = self.schedule_progress(self.step, elapsed)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            total_loss, total_tokens = 0.0, 0
            for _ in range(s.accumulate):
                use_synthetic = synthetic is not None and rng.random() < s.synthetic_fraction
                example = synthetic() if use_synthetic else language_modelling()
                with self.precision():
                    loss, n = example_loss(self.engine, example, noise=noise if s.split_noise else None)
                (loss / max(n, 1) / s.accumulate).backward()
                total_loss += float(loss.detach())
                total_tokens += n
            if self.world > 1:
                self.average_gradients()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, 1.0))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            record = {
                "step": self.step,
                "loss": total_loss / max(total_tokens, 1),
                "lr": lr,
                "grad_norm": grad_norm,
                "elapsed_s": time.perf_counter() - started,
            }
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if s.eval_every and (self.step % s.eval_every == 0 or self.step == s.steps) and self.rank == 0:
                last_eval, last_eval_step = self.evaluate(), self.step
                record["eval"] = last_eval
            self.log(record)
            if s.checkpoint_every and self.step % s.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        if last_eval_step != self.step and self.rank == 0 and self.heldout:
            last_eval = self.evaluate()  # the exported weights' own, also after a budget stop
        return last_eval

    def export(self, path: Path, command: str, final_eval: dict) -> None:
        """Write the trained adapter with its provenance (rank 0 only)."""
        if self.rank != 0:
            return
        adapter = self.engine.adapter
        adapter.provenance = {
            **self.provenance,
            "trained": True,
            "steps": self.step,
            "stopped_by_time_budget": self.stopped_by_budget,
            "settings": asdict(self.settings),
            "heldout_eval": final_eval,
            "heldout_eval_history": self.eval_history(final_eval),
            "command": command,
        }
        adapter.save(path, self.engine.loaded.fingerprint)

    def eval_history(self, final_eval: dict) -> dict[str, float | None]:
        """Gap closed at every held-out evaluation of this run directory, resumed invocations
        included (read back from the loss log), and for the exported weights: step -> share."""
        history: dict[str, float | None] = {}
        log = self.run_dir / LOG_FILE
        records = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
        for record in map(json.loads, records):
            if "eval" in record:
                history[str(record["step"])] = record["eval"].get("gap_closed")
        if final_eval:
            history[str(self.step)] = final_eval.get("gap_closed")
        return {step: None if gap is None else round(gap, 4) for step, gap in history.items()}
