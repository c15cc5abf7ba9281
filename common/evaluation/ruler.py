"""A RULER-style suite (docs/evaluation.md): seven synthetic retrieval tasks at several lengths.

The task definitions of NVIDIA's RULER that need no external data, written for this project
over `sharedllm.common.data.synthetic`, with a held-out book as the prose haystack:

| task | RULER name | haystack | what is asked |
| --- | --- | --- | --- |
| single_noise | niah_single_1 | repeated noise sentences | the number of one key |
| single_prose | niah_single_2 | held-out prose | the number of one key |
| multikey_prose | niah_multikey_1 | prose + 3 needles of other keys | the number of one key |
| multikey_needles | niah_multikey_2 | nothing but needles of other keys | the number of one key |
| multivalue | niah_multivalue | prose | all 4 numbers of one key |
| multiquery | niah_multiquery | prose | the numbers of 4 keys |
| variables | vt | noise | the 5 names of a 4-hop assignment chain |

Metric (RULER's): the share of expected strings found in the answer, averaged per cell.
Each sample's needle sits at depth (i + 0.5) / per_cell; every method answers the same task
through `needle.Answerer`, so only the way the document reaches the model differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sharedllm.common.baselines.streaming import StreamingLLM
from sharedllm.common.data.synthetic import Filler
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.errors import InvalidInput
from sharedllm.common.evaluation.methods import METHODS, baseline_protocol
from sharedllm.common.evaluation.needle import Answerer
from sharedllm.common.evaluation.protocols import RULER_METHODS as DEFAULT_METHODS
from sharedllm.common.evaluation.protocols import RULER_TASKS as TASKS

HAYSTACKS: tuple[str, ...] = ("noise", "prose", "needles")
SCORING = "share of the expected strings found in the answer (case-insensitive), mean over samples (RULER)"


@dataclass(frozen=True)
class RulerSettings:
    lengths: tuple[int, ...]
    tasks: tuple[str, ...] = tuple(TASKS)
    methods: tuple[str, ...] = DEFAULT_METHODS
    per_cell: int = 4
    max_new_tokens: int = 48
    retrieval: bool = True
    seed: int = 0
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)

    def __post_init__(self) -> None:
        if not self.lengths or self.per_cell < 1 or self.max_new_tokens < 1 or min(self.lengths) < 256:
            raise InvalidInput("ruler needs lengths >= 256 tokens, --per-cell >= 1 and --max-new-tokens >= 1")
        if not self.tasks or not set(self.tasks) <= set(TASKS):
            raise InvalidInput(f"tasks must be a non-empty subset of {', '.join(TASKS)}, got {self.tasks}")
        if not self.methods or not set(self.methods) <= set(METHODS):
            raise InvalidInput(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {self.methods}")


def score(expected: Sequence[str], output: str) -> float:
    """RULER's string match: the share of expected strings that occur in the output."""
    found = output.lower()
    return sum(e.lower() in found for e in expected) / len(expected)


def sample_seed(seed: int, task: str, length: int, rep: int) -> int:
    """A cell's tasks do not change when the grid around it does."""
    digest = hashlib.sha256(f"ruler:{seed}:{task}:{length}:{rep}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def evaluate_ruler(
    engine: Engine, fillers: dict[str, Filler], settings: RulerSettings, streaming: StreamingLLM | None
) -> dict[str, Any]:
    """Every task at every length (`per_cell` seeded samples); the JSON-ready report."""
    answer = Answerer.for_settings(engine, streaming, settings)
    bar = tqdm(total=len(settings.tasks) * len(settings.lengths) * settings.per_cell, desc="ruler", file=sys.stderr)
    samples: list[dict[str, Any]] = []
    for name in settings.tasks:
        haystack, build = TASKS[name]
        for length in settings.lengths:
            for rep in range(settings.per_cell):
                depth = (rep + 0.5) / settings.per_cell
                task = build(fillers[haystack], length, depth, sample_seed(settings.seed, name, length, rep))
                expected = task.metadata["answers"]
                for method, output in answer(task).items():
                    samples.append(
                        {
                            "task": name,
                            "length": length,
                            "depth": depth,
                            "tokens": task.metadata["tokens"],
                            "method": method,
                            "expected": expected,
                            "output": output,
                            "score": score(expected, output),
                        }
                    )
                bar.update(1)
    bar.close()
    cells = []
    for method in (m for m in METHODS if m in settings.methods):
        for name in settings.tasks:
            for length in settings.lengths:
                scores = [
                    s["score"] for s in samples if (s["method"], s["task"], s["length"]) == (method, name, length)
                ]
                cells.append(
                    {
                        "method": method,
                        "task": name,
                        "length": length,
                        "n": len(scores),
                        "score": sum(scores) / len(scores) if scores else None,
                    }
                )
    return {
        "protocol": {
            **dataclasses.asdict(settings),
            **baseline_protocol(settings.methods, settings.evidence),
            "window": engine.window,
            "scoring": SCORING,
        },
        "cells": cells,
        "samples": samples,
    }


def _score(report: dict[str, Any], method: str, task: str, length: int) -> float | None:
    for c in report["cells"]:
        if (c["method"], c["task"], c["length"]) == (method, task, length):
            return c["score"]
    return None


def mean_score(report: dict[str, Any], method: str, length: int) -> float | None:
    """Mean over the tasks (None where the method did not run at that length, e.g. full beyond the window)."""
    scores = [_score(report, method, t, length) for t in report["protocol"]["tasks"]]
    return None if any(s is None for s in scores) else sum(scores) / len(scores)


def _methods(report: dict[str, Any]) -> list[str]:
    return [m for m in METHODS if m in report["protocol"]["methods"]]


def format_table(report: dict[str, Any]) -> str:
    """The mean over tasks per method and length, then one block per method: task x length, in %."""
    protocol = report["protocol"]
    lengths, tasks = protocol["lengths"], protocol["tasks"]

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.0f}"

    head = f"{'':>18} " + " ".join(f"{n:>7}" for n in lengths)
    lines = [f"RULER-style mean over {len(tasks)} tasks (%, {protocol['per_cell']} samples per task and length)", head]
    for method in _methods(report):
        lines.append(f"{method:>18} " + " ".join(f"{cell(mean_score(report, method, n)):>7}" for n in lengths))
    for method in _methods(report):
        lines += ["", f"{method} (%)", head]
        for task in tasks:
            row = [cell(_score(report, method, task, n)) for n in lengths]
            lines.append(f"{task:>18} " + " ".join(f"{c:>7}" for c in row))
    if "full" in protocol["methods"]:
        lines += ["", "full: the whole document in the window; the truncation run where it fits, n/a beyond."]
    return "\n".join(lines)


def plot_heatmap(report: dict[str, Any], path: Path, title: str) -> Path:
    """One panel per method: tasks (rows) x lengths (columns), colour = score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    protocol = report["protocol"]
    lengths, tasks, methods = protocol["lengths"], protocol["tasks"], _methods(report)
    fig = Figure(figsize=(1.5 + 0.9 * len(lengths) * len(methods), 1.6 + 0.4 * len(tasks)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=True):
        grid = [[_score(report, method, t, n) for n in lengths] for t in tasks]
        image = ax.imshow(
            [[float("nan") if v is None else v for v in row] for row in grid],
            vmin=0.0,
            vmax=1.0,
            cmap="RdYlGn",
            aspect="auto",
        )
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "n/a" if v is None else f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0] else [""] * len(tasks))
        ax.set_title(method, fontsize=9)
    fig.colorbar(image, ax=list(axes), label="score")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=110)
    return path
