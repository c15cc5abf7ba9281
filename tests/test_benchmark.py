"""`sharedllm bench` end to end on the tiny model, and the reduction of cells to medians, ratios and targets.

Timing is never asserted (that belongs to the benchmark itself): the tests check that every
cell ran in its own process and reported its metrics, and that the medians, ratios and targets
in the report are computed from those measured numbers.
"""

from __future__ import annotations

import json
import statistics

import pytest
from tiny_model import TINY_TREE

from sharedllm.benchmark.runner import RATIOS, TARGETS, BenchConfig, plan, summarize
from sharedllm.benchmark.services import GrpcUnavailable, grpc_stack
from sharedllm.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metric(cells, method, length, metric):
    return [c["metrics"][metric] for c in cells if (c["method"], c["length"]) == (method, length)]


def test_bench_end_to_end(tiny_model_dir, tiny_adapter, tmp_path, capsys):
    report_path, plot_dir = tmp_path / "bench.json", tmp_path / "plots"
    argv = ["bench", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--lengths", "256", "512"]
    argv += ["--repeats", "1", "--max-new-tokens", "4", "--threads", "1", "--up-to", "full=256"]
    argv += ["--up-to", "streaming=256"]
    assert main([*argv, "--json", str(report_path), "--plot-dir", str(plot_dir)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())

    assert report["machine"]["cpus"] >= 1 and report["machine"]["torch"]
    assert report["setup"]["engine"]["tree_config"] == TINY_TREE.to_dict()
    assert report["setup"]["grpc"].startswith("measured")
    assert report["setup"]["skipped"] == [
        "full at 512 tokens (--up-to full=256)",
        "streaming at 512 tokens (--up-to streaming=256)",
    ]
    cells = report["cells"]
    ran = sorted((c["method"], c["length"]) for c in cells)
    assert ran == sorted(
        [(m, 256) for m in ("sharedllm", "full", "streaming", "grpc")] + [("sharedllm", 512), ("grpc", 512)]
    )
    for cell in cells:
        metrics = cell["metrics"]
        assert metrics["compress_s"] > 0 and metrics["repeat_ttft_s"] > 0
        assert metrics["first_ttft_s"] > metrics["compress_s"]  # the first question includes compression
        assert metrics["stored_bytes"] > 0
        if cell["method"] != "grpc":  # the services' memory is not a cell's
            assert metrics["peak_memory_bytes"] > 0 and metrics["resident_after_load_bytes"] > 0
    assert all(_metric(cells, "sharedllm", n, "floor_s")[0] > 0 for n in (256, 512))

    for row in report["medians"]:
        for metric in ("compress_s", "first_ttft_s", "repeat_ttft_s", "stored_bytes"):
            assert row[metric] == statistics.median(_metric(cells, row["method"], row["length"], metric))
    ratios = {(r["name"], r["length"]): r["value"] for r in report["ratios"]}
    for ratio in RATIOS:
        num, den = ratio.numerator, ratio.denominator
        if num.method in ("full", "streaming") or den.method in ("full", "streaming"):
            assert (ratio.name, 512) not in ratios  # skipped baselines leave no ratio behind
        measured = _metric(cells, num.method, 256, num.metric)[0], _metric(cells, den.method, 256, den.metric)[0]
        if None in measured:  # decode speed needs two tokens; the random model may end sooner
            assert (ratio.name, 256) not in ratios
        else:
            assert ratios[(ratio.name, 256)] == pytest.approx(measured[0] / measured[1])
    assert [t["met"] for t in report["targets"]] == [None] * len(TARGETS)  # nothing measured at 32K or 64K

    assert "SharedLLM (gRPC + Redis)" in out and "targets:" in out and "[not measured]" in out
    for name in ("ttft.png", "memory.png"):
        assert (plot_dir / name).read_bytes()[:8] == PNG_MAGIC


def _cell(method, length, repeat, **metrics):
    return {"method": method, "length": length, "repeat": repeat, "metrics": metrics}


def test_ratios_pair_repetitions_and_targets_follow_them():
    cells = [
        # repetition 0: SharedLLM 10x faster; repetition 1: 2x; repetition 2: 6x -> median 6
        _cell("sharedllm", 32768, 0, first_ttft_s=1.0, compress_s=1.1, floor_s=1.0, peak_memory_bytes=100),
        _cell("full", 32768, 0, first_ttft_s=10.0),
        _cell("sharedllm", 32768, 1, first_ttft_s=5.0, compress_s=2.0, floor_s=1.0),
        _cell("full", 32768, 1, first_ttft_s=10.0),
        _cell("sharedllm", 32768, 2, first_ttft_s=2.0, compress_s=1.2, floor_s=1.0),
        _cell("full", 32768, 2, first_ttft_s=12.0),
        _cell("sharedllm", 8192, 0, peak_memory_bytes=90),
        _cell("sharedllm", 65536, 0, peak_memory_bytes=200),
        {"method": "full", "length": 8192, "repeat": 0, "error": "killed"},
    ]
    summary = summarize(cells, [8192, 32768, 65536])
    ratios = {(r["name"], r["length"]): r for r in summary["ratios"]}
    assert ratios[("first_vs_full", 32768)]["value"] == 6.0  # not 32/8 = 4, the ratio of the medians
    assert ratios[("first_vs_full", 32768)]["pairs"] == 3
    assert ratios[("compress_over_floor", 32768)]["value"] == pytest.approx(1.2)
    targets = {t["ratio"]: t for t in summary["targets"]}
    assert targets["first_vs_full"]["met"] is True
    assert targets["compress_over_floor"]["met"] is True
    assert targets["memory_64k_over_8k"]["value"] == pytest.approx(200 / 90)
    assert targets["memory_64k_over_8k"]["met"] is False
    assert targets["repeat_vs_streaming"]["met"] is None
    medians = {(r["method"], r["length"]): r for r in summary["medians"]}
    assert medians[("sharedllm", 32768)]["first_ttft_s"] == 2.0
    assert medians[("full", 8192)]["repetitions"] == 0


def test_plan_alternates_the_order_of_methods():
    config = BenchConfig(lengths=(256, 512), methods=("sharedllm", "full", "streaming"), repeats=2, max_new_tokens=4)
    order = plan(config, with_grpc=False)
    firsts = [order[i][2] for i in range(0, len(order), 3)]
    assert firsts == ["sharedllm", "full", "full", "streaming"]
    assert sorted(order) == sorted((r, n, m) for r in range(2) for n in (256, 512) for m in config.methods)


def test_grpc_stack_without_redis_server_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    with pytest.raises(GrpcUnavailable, match="redis-server is not installed"), grpc_stack(tmp_path, [], None, []):
        pass


def test_bench_concurrency_end_to_end(tiny_model_dir, tiny_adapter, tmp_path, capsys):
    """`sharedllm bench --concurrency`: both workloads at every level, the unbatched baseline in the
    same run, ratios against one client, and a table."""
    report_path = tmp_path / "load.json"
    argv = ["bench", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--concurrency", "1", "3"]
    argv += ["--load-tokens", "256", "--documents", "2", "--questions", "1", "--max-new-tokens", "6"]
    argv += ["--max-batch", "2", "--prefix-cache-mib", "0", "--threads", "1", "--json", str(report_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert set(report["batched"]) == set(report["unbatched"]) == {"same document", "different documents"}
    for workload, levels in report["batched"].items():
        assert [level["clients"] for level in levels] == [1, 3]
        for level in levels:
            assert level["answered"] == level["requests"] == level["clients"] and level["refused"] == {}
            assert level["tokens"] > 0 and level["ttft_p95_s"] >= level["ttft_p50_s"] > 0
        assert report["ratios"][workload]["1"]["tokens_per_s"] == 1.0
        assert report["ratios"][workload]["one client, batched / unbatched tokens/s"] > 0
    assert "| same document | 3 |" in out and "no batching" in out
    assert report["setup"]["prefix_cache_mib"] == 0  # handed to the decoder, which started with it


def test_a_refused_request_is_a_counted_result():
    """A level whose calls all fail reports them by status code; nothing raises."""
    from sharedllm.benchmark.load import LoadConfig, run_level

    level = run_level("127.0.0.1:1", "key", ["ctx"], 2, LoadConfig(concurrency=(2,), questions=1, max_new_tokens=2))
    assert level["answered"] == 0 and level["tokens"] == 0
    assert sum(level["refused"].values()) == 2 and set(level["refused"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert level["ttft_p95_s"] is None
