"""Perplexity against context length (docs/evaluation.md): SharedLLM and its baselines on the same tokens.

For each held-out document and length L, a window is L tokens of preceding context and then
W scored tokens. Within a document every length scores the *same* windows (placed where the
longest length that fits has its whole context), so a change across lengths comes from the
context alone, never from easier or harder scored text. All but the last `decoder_tokens` of
the context are "the document"; the decoder reads the rest of the context (the segment) and
the scored tokens. The methods:
- sharedllm: the document compressed and injected, and evidence excerpts of it (ranked for the
  segment's text, as a question would rank them) in the window before the segment: the
  product's default. With --evidence-tokens 0 it is the tree alone;
- evidence: the same excerpts, nothing injected (a retrieval baseline with the same budget);
- tree: the document injected, no excerpts (the paper's setting);
- window: the segment alone, no earlier text;
- truncation: the last tokens of the context that fit the base window with the scored ones;
- full: the whole context in the base window. It exists only where L + W fits the window,
  and there it *is* truncation (nothing is cut), so it is computed once and reported as such;
- streaming: the whole context streamed through a StreamingLLM sink cache.
As in serving, only the "question" reads the injection: here the decoder segment before the
scored tokens (evidence.shielded_spans); node selection follows the language-modelling
protocol of training (no query: the most recent child). Every method but streaming scores
through training's `example_loss` (the excerpts as an evidence-shaped Example, as training
builds them), so they score exactly the tokens the trainer's held-out evaluation would.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sharedllm.common.baselines.streaming import StreamingLLM
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.evidence import render_excerpts, shielded_spans
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.engine.tree import ContextTree
from sharedllm.common.errors import InvalidInput
from sharedllm.common.evaluation.heldout import HeldoutDocument
from sharedllm.common.evaluation.methods import METHODS, PPL_METHODS, base_window_methods
from sharedllm.common.evaluation.protocols import PPL_LENGTHS as DEFAULT_LENGTHS
from sharedllm.common.training.examples import Example
from sharedllm.common.training.trainer import example_loss, gap_closed

FULL_NOT_FITTING = "context + scored tokens exceed the base window"
GAP_CLOSED = (
    "(window - sharedllm) / (window - full) in mean NLL: the share of what the whole context in the base "
    "window gains over the decoder segment alone that SharedLLM recovers, where the context fits"
)
# full overlaps truncation wherever it exists, and an untrained sharedllm overlaps window: keep both visible.
_STYLES: dict[str, dict[str, Any]] = {
    "full": {"linestyle": "--", "marker": "s", "markersize": 9, "fillstyle": "none"},
    "window": {"linestyle": ":", "marker": "x", "markersize": 8},
}


@dataclass(frozen=True)
class PplSettings:
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    windows: int = 2  # per document and length
    scored: int = 256  # W
    decoder_tokens: int = 256  # context tokens the decoder reads before the scored ones
    methods: tuple[str, ...] = PPL_METHODS
    evidence: EvidenceSettings = dataclasses.field(default_factory=EvidenceSettings)  # sharedllm's and evidence's

    def __post_init__(self) -> None:
        if not self.lengths or self.windows < 1 or self.scored < 1:
            raise InvalidInput("perplexity needs at least one length, --windows >= 1 and --scored-tokens >= 1")
        if not 1 <= self.decoder_tokens < min(self.lengths):
            raise InvalidInput(
                f"--decoder-tokens must be in [1, {min(self.lengths)}) (below the shortest length), "
                f"got {self.decoder_tokens}"
            )
        unknown = set(self.methods) - set(PPL_METHODS)
        if unknown or not self.methods:
            raise InvalidInput(f"methods must be a non-empty subset of {', '.join(PPL_METHODS)}, got {sorted(unknown)}")

    def check_window(self, window: int) -> None:
        """Raise InvalidInput unless the evidence budget, decoder segment and scored tokens fit a
        model's window: the one rule that needs the model, so it cannot wait in __post_init__."""
        if self.evidence.tokens + self.decoder_tokens + self.scored > window:
            raise InvalidInput(
                f"the evidence budget, decoder segment and scored tokens ({self.evidence.tokens} + "
                f"{self.decoder_tokens} + {self.scored}) exceed the window of {window}"
            )


def window_starts(n_tokens: int, lengths: Sequence[int], scored: int, windows: int) -> tuple[list[int], list[int]]:
    """The lengths a document of `n_tokens` can serve, and the starts of its scored windows.

    Starts are spread evenly from the longest usable length to the document's end; one
    window is the published protocol's: the document's last W tokens.
    """
    usable = [length for length in lengths if length + scored <= n_tokens]
    if not usable:
        return [], []
    low, high = max(usable), n_tokens - scored
    if windows == 1:
        return usable, [high]
    return usable, sorted({low + (high - low) * k // (windows - 1) for k in range(windows)})


def fit_window(example: Example, window: int) -> Example:
    """The example with its document cut to the last tokens that fit the window before the decoder segment."""
    keep = max(0, window - len(example.decoder))
    return dataclasses.replace(example, document=example.document[max(0, len(example.document) - keep) :])


def window_nll(
    engine: Engine,
    streaming: StreamingLLM | None,
    context: list[int],
    scored: list[int],
    settings: PplSettings,
) -> tuple[dict[str, float], dict[str, float]]:
    """Summed NLL of the scored tokens per method (full only where it fits), and seconds per method."""
    d, wanted = settings.decoder_tokens, settings.methods
    example = Example(context[:-d], context[-d:] + scored, d, None)
    fitted = fit_window(example, engine.window)
    served = base_window_methods(wanted, len(fitted.document) == len(example.document))
    runs: dict[str, Callable[[], float]] = {}
    with_excerpts = [m for m in ("sharedllm", "evidence") if m in wanted and settings.evidence.tokens > 0]
    tree: ContextTree | None = None
    if with_excerpts:
        tree = engine.compressor.compress(example.document)
        excerpts = excerpt_ids(engine, tree, context[-d:], settings.evidence)
        decoder = excerpts + example.decoder
        first = len(excerpts) + example.scored_from
        shielded = shielded_spans(settings.evidence, (len(excerpts), first), len(decoder))
        shaped = Example(example.document, decoder, first, None, shielded)
        for method in with_excerpts:
            inject = method == "sharedllm"
            runs[method] = lambda inject=inject: float(example_loss(engine, shaped, inject=inject, tree=tree)[0])
    if "tree" in wanted or ("sharedllm" in wanted and not with_excerpts):
        runs["tree"] = lambda: float(example_loss(engine, example)[0])
    if "window" in wanted or ("evidence" in wanted and not with_excerpts):
        runs["window"] = lambda: float(example_loss(engine, example, inject=False)[0])
    if served:
        runs["base"] = lambda: float(example_loss(engine, fitted, full_context=True)[0])
    if streaming is not None:
        runs["streaming"] = lambda: streaming.score(context + scored, len(context))[0]
    nll: dict[str, float] = {}
    seconds: dict[str, float] = {}
    with torch.inference_mode():
        for method, run in runs.items():
            start = time.perf_counter()
            nll[method] = run()
            seconds[method] = time.perf_counter() - start
    # Without a budget, sharedllm is the tree alone and evidence is the window alone: one run each.
    for method, same in (("sharedllm", "tree"), ("evidence", "window")):
        if method in wanted and method not in nll:
            nll[method], seconds[method] = nll[same], seconds[same]
    for method in ("tree", "window"):
        if method not in wanted:
            nll.pop(method, None)
            seconds.pop(method, None)
    if served:
        base = nll.pop("base"), seconds.pop("base")
        for method in served:
            nll[method], seconds[method] = base
    return nll, seconds


def excerpt_ids(engine: Engine, tree: ContextTree, segment: list[int], evidence: EvidenceSettings) -> list[int]:
    """The excerpts for a window: passages of the document ranked for the segment's text (the
    lexical ranking and the tree's retrieval keys, as a question's), rendered as in serving."""
    question = engine.tokenizer.decode(segment)
    query = engine.decoder.query_vector(segment)
    passages, _ = engine.choose_evidence(tree, question, query, evidence, evidence.tokens)
    return engine.tokenizer(render_excerpts(passages), add_special_tokens=False)["input_ids"]


def evaluate_perplexity(
    engine: Engine,
    documents: Sequence[HeldoutDocument],
    settings: PplSettings,
    streaming: StreamingLLM | None,
) -> dict[str, Any]:
    """Every window of every document at every length; returns the JSON-ready report."""
    settings.check_window(engine.window)
    if ("streaming" in settings.methods) != (streaming is not None):
        raise ValueError("pass a StreamingLLM exactly when the streaming method is asked for")
    plan = [
        (doc, *window_starts(len(doc.tokens), settings.lengths, settings.scored, settings.windows)) for doc in documents
    ]
    bar = tqdm(total=sum(len(u) * len(s) for _, u, s in plan), desc="ppl windows", file=sys.stderr)
    # (length, document or None for all of them, method) -> [summed NLL, scored tokens, seconds]
    totals: dict[tuple[int, str | None, str], list[float]] = {}
    windows: list[dict[str, Any]] = []
    for doc, usable, starts in plan:
        for start in starts:
            scored = doc.tokens[start : start + settings.scored].tolist()
            for length in usable:
                context = doc.tokens[start - length : start].tolist()
                nll, seconds = window_nll(engine, streaming, context, scored, settings)
                for method, value in nll.items():
                    for key in ((length, None, method), (length, doc.name, method)):
                        acc = totals.setdefault(key, [0.0, 0, 0.0])
                        acc[0] += value
                        acc[1] += len(scored)
                        acc[2] += seconds[method]
                windows.append({"document": doc.name, "start": start, "length": length, "nll": nll})
                bar.update(1)
    bar.close()
    rows = []
    for length in settings.lengths:
        names = sorted({w["document"] for w in windows if w["length"] == length})
        n_windows = sum(1 for w in windows if w["length"] == length)
        row = {"length": length, "documents": len(names), "windows": n_windows}
        row.update(_summary(totals, length, None, settings.methods, bool(names)))
        row["per_document"] = {name: _summary(totals, length, name, settings.methods, True) for name in names}
        rows.append(row)
    return {
        "protocol": {
            **dataclasses.asdict(settings),
            "window": engine.window,
            "perplexity": "exp of the mean next-token NLL over all scored tokens of a length",
            "gap_closed": GAP_CLOSED,
            "documents": {doc.name: len(doc.tokens) for doc in documents},
        },
        "lengths": rows,
        "windows": windows,
    }


def _summary(
    totals: dict[tuple[int, str | None, str], list[float]],
    length: int,
    document: str | None,
    asked: Sequence[str],
    measured: bool,
) -> dict[str, Any]:
    """Perplexity per method and the gap closed, for one length over one document or all of them."""
    methods: dict[str, dict[str, Any]] = {}
    for method in (m for m in METHODS if m in asked):
        if (length, document, method) in totals:
            total, tokens, seconds = totals[length, document, method]
            methods[method] = {
                "ppl": math.exp(total / tokens),
                "mean_nll": total / tokens,
                "tokens": tokens,
                "seconds": seconds,
            }
        elif method == "full" and measured:
            methods[method] = {"ppl": None, "note": FULL_NOT_FITTING}
    if "full" in methods and methods["full"]["ppl"] is not None and "truncation" in methods:
        methods["full"] = {"same_as": "truncation", **methods["truncation"]}
    return {"methods": methods, "gap_closed": _gap_closed(methods)}


def _gap_closed(methods: dict[str, dict[str, Any]]) -> float | None:
    """GAP_CLOSED where full attention ran (in the window), else None."""
    try:
        window, shared, full = (methods[m]["mean_nll"] for m in ("window", "sharedllm", "full"))
    except KeyError:
        return None
    return gap_closed(window, shared, full)


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    if "same_as" in entry:
        return "=" + entry["same_as"][:5]
    return "n/a" if entry["ppl"] is None else f"{entry['ppl']:.3f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_table(report: dict[str, Any]) -> str:
    """Mean perplexity per length and method with the gap closed; then SharedLLM per document."""
    methods = [m for m in METHODS if m in report["protocol"]["methods"]]
    lines = [f"{'length':>7} {'docs':>5} {'windows':>8} " + " ".join(f"{m:>11}" for m in methods) + "  gap closed"]
    for row in report["lengths"]:
        cells = " ".join(f"{_cell(row['methods'].get(m)):>11}" for m in methods)
        lines.append(
            f"{row['length']:>7} {row['documents']:>5} {row['windows']:>8} {cells}  {_percent(row['gap_closed']):>10}"
        )
    if "full" in methods:
        lines.append(
            "full: the whole context in the base window; where it fits it is the same run as truncation "
            f"(=trunc), elsewhere n/a ({FULL_NOT_FITTING})."
        )
    if any(row["gap_closed"] is not None for row in report["lengths"]):
        lines.append(f"gap closed: {GAP_CLOSED}.")
    documents = list(report["protocol"]["documents"])
    if "sharedllm" in methods and len(documents) > 1:
        width = max(len(d) for d in documents)
        lines.append("")
        lines.append("sharedllm perplexity per document (gap closed where full attention fits):")
        lines.append(f"{'document':<{width}} " + " ".join(f"{row['length']:>16}" for row in report["lengths"]))
        for name in documents:
            cells = []
            for row in report["lengths"]:
                entry = row["per_document"].get(name)
                if entry is None or "sharedllm" not in entry["methods"]:
                    cells.append("-")
                    continue
                gap = "" if entry["gap_closed"] is None else f" ({_percent(entry['gap_closed'])})"
                cells.append(f"{entry['methods']['sharedllm']['ppl']:.3f}{gap}")
            lines.append(f"{name:<{width}} " + " ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def plot_perplexity(report: dict[str, Any], path: Path, title: str) -> None:
    """Perplexity against context length, one line per method (full only where it fits)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method in (m for m in METHODS if m in report["protocol"]["methods"]):
        points = [
            (row["length"], row["methods"][method]["ppl"])
            for row in report["lengths"]
            if row["methods"].get(method, {}).get("ppl") is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=method, **_STYLES.get(method, {"marker": "o"}))
    lengths = [row["length"] for row in report["lengths"]]
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"perplexity of the last {report['protocol']['scored']} tokens")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
