"""`sharedllm bench --soak-s 600`: a mixed load held for minutes against one compressor and one
decoder, over gRPC, as production meets it.

A private redis-server and both services as `sharedllm serve` runs them. A few documents are
stored first; then, until the time is up, `questions` clients ask question after question about
them (closed loop, free generation to `max_new_tokens`) while `compressions` clients each store a
new document of `tokens` tokens and delete it again (so the store stays bounded over minutes).
Every call's outcome is counted by status code, never raised; latency percentiles are per kind
of call; each service's resident memory is sampled every `sample_s` seconds, so a leak shows as
a slope. The suite runs a 60-second form on the tiny model (`tests/test_soak.py`).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sharedllm.benchmark.load import ask, percentile
from sharedllm.benchmark.runner import describe_machine
from sharedllm.benchmark.services import grpc_stack
from sharedllm.benchmark.workload import QUESTIONS, document_tokens
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.rpc.client import CompressorClient, DecoderClient, RemoteError
from sharedllm.common.telemetry.memory import resident_bytes

TENANT = "soak"
MIB = 1 << 20


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 600.0
    questions: int = 32  # clients asking at once
    compressions: int = 8  # clients compressing at once
    tokens: int = 2048  # of each document
    documents: int = 4  # stored before the load, asked about
    max_new_tokens: int = 32
    sample_s: float = 10.0
    threads: int | None = None
    model: str | None = None
    model_flags: tuple[str, ...] = ()


class Outcomes:
    """Per kind of call: how many ended with each status, and the latencies of those that worked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.codes: dict[str, dict[str, int]] = {"generate": {}, "compress": {}}
        self.seconds: dict[str, list[float]] = {"generate": [], "compress": [], "first_token": []}

    def add(self, kind: str, code: str, seconds: float | None = None, first_token_s: float | None = None) -> None:
        with self._lock:
            self.codes[kind][code] = self.codes[kind].get(code, 0) + 1
            if seconds is not None:
                self.seconds[kind].append(seconds)
            if first_token_s is not None:
                self.seconds["first_token"].append(first_token_s)

    def latencies(self) -> dict[str, dict[str, float | None]]:
        return {
            kind: {f"p{q}": _round(percentile(values, q / 100)) for q in (50, 95, 99)}
            for kind, values in self.seconds.items()
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_soak(config: SoakConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole run (see the module doc); a JSON-ready report."""
    from transformers import AutoTokenizer

    from sharedllm.common.model_loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(config.model)), local_files_only=True)
    pool = document_tokens(tokenizer, config.tokens * (config.documents + config.compressions + 1))
    flags = ["--max-concurrent", str(config.questions), "--max-queued", str(config.questions)]
    outcomes = Outcomes()
    memory: list[dict[str, float]] = []
    with (
        tempfile.TemporaryDirectory(prefix="sharedllm-soak-") as tmp,
        grpc_stack(Path(tmp), config.model_flags, config.threads, [TENANT], flags) as targets,
    ):
        api_key = targets.api_keys[TENANT]
        with CompressorClient(targets.compressor, api_key=api_key, timeout_s=1800) as compressor:
            contexts = [
                compressor.compress(pool[i * config.tokens : (i + 1) * config.tokens], pin=True).context_id
                for i in range(config.documents)
            ]
        params = free_generation(SamplingParams(max_new_tokens=config.max_new_tokens))
        started = time.perf_counter()
        end = started + config.seconds
        stop = threading.Event()
        tokenizer_lock = threading.Lock()

        def questions(index: int) -> None:
            with DecoderClient(targets.decoder, api_key=api_key, timeout_s=600) as decoder:
                n = 0
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    answered = ask(
                        decoder, contexts[(index + n) % len(contexts)], QUESTIONS[n % len(QUESTIONS)], params
                    )
                    n += 1
                    if answered.refused is None:
                        outcomes.add("generate", "OK", time.perf_counter() - t0, answered.ttft_s)
                    else:
                        outcomes.add("generate", answered.refused)

        def compressions(index: int) -> None:
            with CompressorClient(targets.compressor, api_key=api_key, timeout_s=600) as compressor:
                n = 0
                while time.perf_counter() < end:
                    # A document of its own each time (a heading of its own, then a stretch of the
                    # text), so that none is deduplicated with another, nor with those asked about.
                    with tokenizer_lock:  # a fast tokenizer is not to be used by two threads at once
                        heading = tokenizer(f"Copy {index}.{n}:", add_special_tokens=False)["input_ids"]
                    offset = (index * 7919 + n * 104729) % (len(pool) - config.tokens)
                    n += 1
                    t0 = time.perf_counter()
                    try:
                        stored = compressor.compress(heading + pool[offset : offset + config.tokens])
                        outcomes.add("compress", "OK", time.perf_counter() - t0)
                        compressor.delete(stored.context_id)
                    except RemoteError as exc:
                        outcomes.add("compress", exc.code.name)

        def sample() -> None:
            while not stop.wait(config.sample_s):
                memory.append(
                    {
                        "t_s": round(time.perf_counter() - started, 1),
                        **{f"{s}_mib": round(resident_bytes(pid) / MIB, 1) for s, pid in targets.pids.items()},
                    }
                )
                progress(f"{memory[-1]['t_s']:.0f} s: {outcomes.codes}")

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(config.questions + config.compressions) as workers:
            futures = [workers.submit(questions, i) for i in range(config.questions)]
            futures += [workers.submit(compressions, i) for i in range(config.compressions)]
            for future in futures:
                future.result()  # a client's own bug surfaces here
        wall = time.perf_counter() - started
        stop.set()
        sampler.join()
    return {
        "setup": asdict(config),
        "machine": describe_machine(None),
        "seconds": round(wall, 1),
        "calls": outcomes.codes,
        "per_minute": {k: round(v.get("OK", 0) * 60 / wall, 1) for k, v in outcomes.codes.items()},
        "latency_s": outcomes.latencies(),
        "memory": memory,
    }


def format_soak(report: dict[str, Any]) -> str:
    lat = report["latency_s"]
    lines = [f"{report['seconds']} s, {report['setup']['questions']} questions and "
             f"{report['setup']['compressions']} compressions in flight"]  # fmt: skip
    for kind in ("generate", "compress"):
        codes = ", ".join(f"{code} {n}" for code, n in sorted(report["calls"][kind].items())) or "none"
        lines.append(
            f"{kind:<9} {codes}; {report['per_minute'][kind]}/min; seconds p50 {lat[kind]['p50']} "
            f"p95 {lat[kind]['p95']} p99 {lat[kind]['p99']}"
        )
    ft = lat["first_token"]
    lines.append(f"first token p50 {ft['p50']} p95 {ft['p95']} p99 {ft['p99']} s")
    if report["memory"]:
        first, last = report["memory"][0], report["memory"][-1]
        for key in (k for k in first if k.endswith("_mib")):
            lines.append(
                f"{key[:-4]} resident {first[key]} MiB at {first['t_s']} s, {last[key]} MiB at {last['t_s']} s"
            )
    return "\n".join(lines)
