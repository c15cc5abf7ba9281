"""The benchmark's outputs: a printed table, the JSON report and PNG plots, all from the report dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sharedllm.benchmark.runner import RATIOS

MIB = 1 << 20
# (column title, metric, scale): the medians table, one row per (length, method)
COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("compress s", "compress_s", 1.0),
    ("floor s", "floor_s", 1.0),
    ("first TTFT s", "first_ttft_s", 1.0),
    ("repeat TTFT s", "repeat_ttft_s", 1.0),
    ("decode tok/s", "decode_tokens_per_s", 1.0),
    ("peak MiB", "peak_memory_bytes", MIB),
    ("stored MiB", "stored_bytes", MIB),
)
METHOD_LABELS = {
    "sharedllm": "SharedLLM (embedded)",
    "grpc": "SharedLLM (gRPC + Redis)",
    "full": "full attention",
    "streaming": "StreamingLLM",
}


def _number(value: float | None) -> str:
    """Three significant digits, without scientific notation for the sizes seen here."""
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _header(report: dict[str, Any]) -> list[str]:
    m, s = report["machine"], report["setup"]
    engine = s["engine"]
    lines = [
        f"machine: {m['cpu']}, {m['cpus_usable']} of {m['cpus']} CPUs, "
        + (f"{m['memory_bytes'] / (1 << 30):.1f} GiB, " if m["memory_bytes"] else "")
        + f"GPU: {m['gpu'] or 'none'}; torch {m['torch']}, transformers {m['transformers']}; "
        + f"load average {m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end",
    ]
    if engine:
        tree = engine["tree_config"]
        trained = "trained" if engine["adapter_trained"] else "untrained"
        lines.append(
            f"model: {engine['model']} on {engine['device']} ({engine['dtype']}, "
            f"torch threads: {engine['torch_threads']}); adapter {trained}, M={tree['n_layers']} "
            f"C={tree['chunk_size']} D={tree['depth']} P={tree['pool_size']} {tree['encoding']}"
        )
        if "streaming" in engine:
            st = engine["streaming"]
            lines.append(
                f"StreamingLLM: {st['sinks']} sinks + {st['recent']} recent tokens, fed {st['piece']} at a time"
            )
        lines.append(f"full attention past the model's {engine['window']}-token window is timed for its cost only")
    lines.append(f"gRPC + Redis: {s['grpc']}")
    lines.append("peak memory: the whole process (weights included), from the end of the warm-up")
    lines.append(
        f"{s['repeats']} repetition(s), methods alternating; medians; ratios are medians of same-repetition ratios; "
        f"greedy decoding of up to {s['max_new_tokens']} tokens"
    )
    return lines


def _row(cells: list[str], widths: list[int]) -> str:
    """Numbers right-aligned, the method (second column) left-aligned."""
    return "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def _medians_table(report: dict[str, Any]) -> list[str]:
    widths = [7, 25, *(max(len(title), 8) for title, _, _ in COLUMNS), 3]
    lines = [_row(["tokens", "method", *(title for title, _, _ in COLUMNS), "n"], widths)]
    for row in report["medians"]:
        cells = [str(row["length"]), METHOD_LABELS.get(row["method"], row["method"])]
        cells += [_number(row[metric] / scale if metric in row else None) for _, metric, scale in COLUMNS]
        cells.append(str(row["repetitions"]))
        lines.append(_row(cells, widths))
    return lines


def _ratios_table(report: dict[str, Any]) -> list[str]:
    lengths = report["setup"]["lengths"]
    found = {(r["name"], r["length"]): r["value"] for r in report["ratios"]}
    width = max(len(r.text) for r in RATIOS)
    lines = ["ratio (x)".ljust(width) + "".join(str(n).rjust(9) for n in lengths)]
    for ratio in RATIOS:
        values = [found.get((ratio.name, n)) for n in lengths]
        if any(v is not None for v in values):
            lines.append(ratio.text.ljust(width) + "".join(_number(v).rjust(9) for v in values))
    return lines


def _targets(report: dict[str, Any]) -> list[str]:
    lines = []
    for t in report["targets"]:
        status = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = f": {_number(t['value'])}x" if t["value"] is not None else ""
        where = f" at {t['length']} tokens" if t["length"] else ""
        lines.append(f"  [{status}] {t['text']}{where}{value}")
    return lines


def format_table(report: dict[str, Any]) -> str:
    lines = [*_header(report), "", *_medians_table(report), "", *_ratios_table(report), "", "targets:"]
    lines += _targets(report)
    for skipped in report["setup"]["skipped"]:
        lines.append(f"skipped: {skipped}")
    for cell in report["cells"]:
        if "error" in cell:
            lines.append(
                f"failed: {cell['method']} at {cell['length']} tokens, repetition {cell['repeat'] + 1}: {cell['error']}"
            )
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _series(report: dict[str, Any], method: str, metric: str) -> tuple[list[int], list[float]]:
    points = [(r["length"], r[metric]) for r in report["medians"] if r["method"] == method and metric in r]
    return [p[0] for p in points], [p[1] for p in points]


def write_plots(report: dict[str, Any], directory: Path) -> list[Path]:
    """ttft.png (first and repeat question against length, per method) and memory.png (peak memory).

    Time goes on a log axis (methods differ by orders of magnitude); memory on a linear axis
    from zero, so that a flat curve looks flat.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHOD_LABELS if any(r["method"] == m for r in report["medians"])]
    lengths = report["setup"]["lengths"]
    memory_kind = "GPU allocated" if report["machine"]["gpu"] else "CPU resident"
    figures = (
        (
            "ttft.png",
            "time to first token (s)",
            (("first_ttft_s", "-", ", first question"), ("repeat_ttft_s", "--", ", repeat")),
        ),
        ("memory.png", f"peak memory, {memory_kind} (MiB)", (("peak_memory_bytes", "-", ""),)),
    )
    written = []
    for name, ylabel, curves in figures:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for index, method in enumerate(methods):
            for metric, style, suffix in curves:
                x, y = _series(report, method, metric)
                scale = MIB if metric.endswith("_bytes") else 1.0
                if x:
                    label = METHOD_LABELS[method] + suffix
                    ax.plot(x, [v / scale for v in y], style, marker="o", color=f"C{index}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [_length_label(n) for n in lengths])
        if name == "ttft.png":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, ax.dataLim.ymax * 1.15)
        ax.set_xlabel("document tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(f"medians of {report['setup']['repeats']} repetition(s); {report['machine']['cpu']}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)
        written.append(directory / name)
    return written
