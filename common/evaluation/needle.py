"""Needle and passkey retrieval (docs/evaluation.md): accuracy per length x depth, greedy decoding.

Tasks come from `sharedllm.common.data.synthetic`: the classic passkey in repetitive filler, and
RULER's single needle with a held-out book as the haystack, both fitted to the length by
counting tokens and seeded per cell. Every method answers the same chat-formatted question,
the assistant's turn opened with the task's answer prefix ("The pass key is"), so only the
way the document reaches the model differs:
- sharedllm: the document is compressed and injected (query-aware retrieval unless disabled)
  and evidence passages chosen for the question fill the evidence budget of the window; the
  answer is grounded in the document; free: the same with free generation;
- evidence: the same passages, no tree; tree: the tree, no passages (the paper's setting);
- window: no document at all (the floor: what the question alone gives);
- truncation: the last document tokens that fit the window, opening the user message before
  the question (as a user would paste it);
- full: the whole document, only where it fits; there it is the truncation run;
- streaming: the same prompt as full, streamed through a StreamingLLM sink cache.
Passkey is scored by exact match of the first number in the answer; the needle by whether
its value appears in the answer (RULER).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sharedllm.common.baselines.streaming import StreamingLLM
from sharedllm.common.data.synthetic import Filler, Task, generate_tasks
from sharedllm.common.engine.engine import Engine, QuestionPlan
from sharedllm.common.engine.evidence import find_tokens
from sharedllm.common.engine.params import EvidenceSettings, SamplingParams, free_generation
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.errors import InvalidInput
from sharedllm.common.evaluation.methods import (
    DOCUMENT_METHODS,
    METHODS,
    base_window_methods,
    baseline_protocol,
    method_params,
    plain_bm25,
)
from sharedllm.common.evaluation.protocols import NEEDLE_DEPTHS as DEFAULT_DEPTHS
from sharedllm.common.evaluation.protocols import NEEDLE_METHODS as DEFAULT_METHODS
from sharedllm.common.evaluation.protocols import NEEDLE_TASKS as TASKS

SCORING = "passkey: the first number of the answer equals the key; needle: every asked value appears in the answer"


@dataclass(frozen=True)
class NeedleSettings:
    lengths: tuple[int, ...]
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    tasks: tuple[str, ...] = TASKS
    methods: tuple[str, ...] = DEFAULT_METHODS
    per_cell: int = 1
    max_new_tokens: int = 16
    retrieval: bool = True
    seed: int = 0
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)

    def __post_init__(self) -> None:
        if not self.lengths or not self.depths or self.per_cell < 1 or self.max_new_tokens < 1:
            raise InvalidInput("needle needs lengths, depths, --per-cell >= 1 and --max-new-tokens >= 1")
        if not set(self.tasks) <= set(TASKS) or not self.tasks:
            raise InvalidInput(f"tasks must be a non-empty subset of {', '.join(TASKS)}, got {self.tasks}")
        if not set(self.methods) <= set(METHODS) or not self.methods:
            raise InvalidInput(f"methods must be a non-empty subset of {', '.join(METHODS)}, got {self.methods}")


def is_correct(kind: str, answers: Sequence[str], output: str) -> bool:
    """Passkey: the first number of the output is the key. Needle: every asked value appears."""
    if kind == "passkey":
        return re.findall(r"\d+", output)[:1] == list(answers)
    return all(answer in output for answer in answers)


class Answerer:
    """Runs one task through every requested method and returns each method's answer text."""

    def __init__(
        self,
        engine: Engine,
        streaming: StreamingLLM | None,
        methods: Sequence[str],
        max_new_tokens: int,
        evidence: EvidenceSettings,
        retrieval: bool = True,
    ) -> None:
        self.engine = engine
        self.streaming = streaming
        self.methods = tuple(methods)
        self.max_new_tokens = max_new_tokens
        self.evidence = evidence
        self.retrieval = retrieval
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.free = free_generation(self.params)  # the free method and the base model's own methods
        self._separator = self._tokens("\n\n")  # between the document and the question

    @classmethod
    def for_settings(cls, engine: Engine, streaming: StreamingLLM | None, settings: Any) -> Answerer:
        """The answerer an evaluation's settings ask for (needle's or RULER's: methods, max_new_tokens,
        evidence, retrieval); a StreamingLLM must come exactly when the streaming method is asked for."""
        if ("streaming" in settings.methods) != (streaming is not None):
            raise ValueError("pass a StreamingLLM exactly when the streaming method is asked for")
        return cls(engine, streaming, settings.methods, settings.max_new_tokens, settings.evidence, settings.retrieval)

    def _tokens(self, text: str) -> list[int]:
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _greedy(self, plan: QuestionPlan, params: SamplingParams) -> str:
        return run_to_end(self.engine.decode(plan, params)).text

    def _layout(self, question: str) -> tuple[list[int], list[int]]:
        """The chat prompt of `question` cut where the question starts, so a document can open the user message.

        Measured on the default model (1K tokens, 3 tasks each): with the document in the user
        message the base model found 2/3 passkeys; with it before the chat template, 0/3.
        """
        prompt = self.engine.prompt_ids(question)
        at = find_tokens(prompt, self._tokens(question), last=True)
        if at is None:
            raise ValueError("the chat template does not hold the question's tokens verbatim")
        return prompt[:at], prompt[at:]

    def __call__(self, task: Task) -> dict[str, str]:
        """Answer text per method; `full` only where the whole document fits the window."""
        engine, wanted, max_new = self.engine, set(self.methods), self.max_new_tokens
        document = self._tokens(task.document)
        head, tail = self._layout(task.question)
        tail = tail + self._tokens(task.metadata["answer_prefix"])

        def with_document(ids: list[int]) -> list[int]:
            return head + ids + self._separator + tail

        budget = engine.window - len(with_document([])) - max_new
        if budget < 0:
            raise InvalidInput(f"the question and answer ({len(with_document([]))} + {max_new}) exceed the window")
        answers: dict[str, str] = {}
        with torch.inference_mode():
            reading = [m for m in DOCUMENT_METHODS if m in wanted]
            if reading:
                tree = engine.compressor.compress(document)
                index = None
                if any(DOCUMENT_METHODS[m].evidence for m in reading) and self.evidence.tokens > 0:
                    index = engine.passage_index(tree, self.evidence.passage_tokens)
            for method in reading:
                how = DOCUMENT_METHODS[method]
                evidence = plain_bm25(self.evidence) if how.plain else self.evidence
                plan = engine.plan(
                    tree,
                    task.question,
                    max_new_tokens=max_new,
                    evidence=dataclasses.replace(evidence, tokens=evidence.tokens if how.evidence else 0),
                    retrieval=self.retrieval and not how.plain,
                    inject=how.inject,
                    answer_prefix=task.metadata["answer_prefix"],
                    index=index,
                    quote=method_params(how, self.params).grounding == "quote",
                )
                answers[method] = self._greedy(plan, method_params(how, self.params))
            if "window" in wanted:
                answers["window"] = self._greedy(QuestionPlan(head + tail), self.free)
            served = base_window_methods(wanted, len(document) <= budget)
            if served:
                base = self._greedy(QuestionPlan(with_document(document[max(0, len(document) - budget) :])), self.free)
                answers.update(dict.fromkeys(served, base))
            if self.streaming is not None:
                events = self.streaming.generate(
                    with_document(document), self.free, engine.decoder.eos_ids, engine.decode_text
                )
                answers["streaming"] = run_to_end(events).text
        return answers


def evaluate_needles(
    engine: Engine, fillers: dict[str, Filler], settings: NeedleSettings, streaming: StreamingLLM | None
) -> dict[str, Any]:
    """Every task kind at every length x depth (`per_cell` seeded tasks each); the JSON-ready report."""
    answer = Answerer.for_settings(engine, streaming, settings)
    total = len(settings.tasks) * len(settings.lengths) * len(settings.depths) * settings.per_cell
    bar = tqdm(total=total, desc="needle tasks", file=sys.stderr)
    samples: list[dict[str, Any]] = []
    for kind in settings.tasks:
        tasks = generate_tasks(kind, fillers[kind], settings.lengths, settings.depths, settings.per_cell, settings.seed)
        for task in tasks:
            expected = task.metadata["answers"]
            for method, output in answer(task).items():
                samples.append(
                    {
                        "task": kind,
                        "length": task.metadata["length"],
                        "depth": task.depth,
                        "seed": task.metadata["seed"],
                        "tokens": task.metadata["tokens"],
                        "method": method,
                        "expected": expected,
                        "output": output,
                        "correct": is_correct(kind, expected, output),
                    }
                )
            bar.update(1)
    bar.close()
    cells = []
    for kind in settings.tasks:
        for method in (m for m in METHODS if m in settings.methods):
            for length in settings.lengths:
                for depth in settings.depths:
                    hits = [
                        s["correct"]
                        for s in samples
                        if (s["task"], s["method"], s["length"], s["depth"]) == (kind, method, length, depth)
                    ]
                    accuracy = sum(hits) / len(hits) if hits else None
                    cells.append(
                        {
                            "task": kind,
                            "method": method,
                            "length": length,
                            "depth": depth,
                            "n": len(hits),
                            "accuracy": accuracy,
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


def _grid(report: dict[str, Any], kind: str, method: str) -> list[list[float | None]]:
    """Accuracy [depth][length] of one task and method (None: not run, e.g. full beyond the window)."""
    by_cell = {
        (c["length"], c["depth"]): c["accuracy"] for c in report["cells"] if (c["task"], c["method"]) == (kind, method)
    }
    protocol = report["protocol"]
    return [[by_cell[length, depth] for length in protocol["lengths"]] for depth in protocol["depths"]]


def format_table(report: dict[str, Any]) -> str:
    """One block per task and method: rows are depths, columns lengths, cells accuracy."""
    protocol = report["protocol"]
    lines: list[str] = []
    for kind in protocol["tasks"]:
        for method in (m for m in METHODS if m in protocol["methods"]):
            lines.append(f"{kind} / {method}  (accuracy, {protocol['per_cell']} per cell)")
            lines.append(f"{'depth':>6} " + " ".join(f"{length:>7}" for length in protocol["lengths"]))
            for depth, row in zip(protocol["depths"], _grid(report, kind, method), strict=True):
                cells = ["n/a" if a is None else f"{a:.2f}" for a in row]
                lines.append(f"{depth:>6.2f} " + " ".join(f"{c:>7}" for c in cells))
            lines.append("")
    if "full" in protocol["methods"]:
        lines.append("full: the whole document in the window; the truncation run where it fits, n/a beyond.")
    return "\n".join(lines).rstrip()


def heatmap_paths(path: Path, methods: Sequence[str]) -> dict[str, Path]:
    """One PNG per method next to `path`: results.png -> results-sharedllm.png, ..."""
    return {m: path.with_name(f"{path.stem}-{m}{path.suffix or '.png'}") for m in methods}


def plot_heatmaps(report: dict[str, Any], path: Path, title: str) -> list[Path]:
    """A heat map of accuracy (depth x length) per method, one panel per task; returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    protocol = report["protocol"]
    lengths, depths, kinds = protocol["lengths"], protocol["depths"], protocol["tasks"]
    written = []
    for method, target in heatmap_paths(path, [m for m in METHODS if m in protocol["methods"]]).items():
        fig = Figure(figsize=(2 + 1.1 * len(lengths) * len(kinds), 2 + 0.45 * len(depths)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(kinds), squeeze=False)[0]
        for ax, kind in zip(axes, kinds, strict=True):
            grid = [[float("nan") if a is None else a for a in row] for row in _grid(report, kind, method)]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    ax.text(j, i, "n/a" if value != value else f"{value:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_xlabel("length (tokens)")
            ax.set_ylabel("depth")
            ax.set_title(f"{kind}: {method}", fontsize=9)
        fig.colorbar(image, ax=list(axes), label="accuracy")
        fig.suptitle(title, fontsize=8)
        fig.savefig(target, dpi=110)
        written.append(target)
    return written
