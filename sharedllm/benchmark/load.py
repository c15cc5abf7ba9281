"""`sharedllm bench --concurrency 1 2 4 8 16`: one decoder under many clients at once, over gRPC.

A private redis-server and both services, as `sharedllm serve` runs them. Documents of
`tokens` tokens (the Bible from Ruth on, each document starting further in) are compressed
once; then, at each concurrency C, C clients each ask `questions` questions one after another
(closed loop: a client asks again as soon as its answer ends), every answer decoded freely to
`max_new_tokens` tokens (greedy, no grounding: the same work per answer whatever it says).
Two workloads per C: every client on the same document, and client i on document i mod D.
Client i asks the two benchmark questions in turn starting with question i mod 2, so prompts
repeat across clients and levels: with the decoder's prefix cache on (`prefix_cache_mib` None:
its default) a repeated prompt starts from the blocks kept, and `prefix_cache_mib` 0 measures
every prompt read in full. The warm-up asks a question no level asks.

Measured on the client, per level: aggregate generated tokens/s and questions/s over the wall
time of the level, time to first token and inter-token latency (p50, p95), and refusals
(RESOURCE_EXHAUSTED and any other status: a counted result, never a traceback). With
`unbatched_baseline`, the same levels of one client run first against a decoder that steps each
answer alone (`--max-batch 0`), the speed before continuous batching, in the same run.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sharedllm.benchmark.runner import describe_machine
from sharedllm.benchmark.services import grpc_stack
from sharedllm.benchmark.workload import QUESTIONS, document_tokens
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.engine.results import Finished, TokenDelta
from sharedllm.common.rpc.client import CompressorClient, DecoderClient, RemoteError

TENANT = "load"
WARM_UP_QUESTION = "What is the first thing this text tells?"
WORKLOADS = ("same document", "different documents")


@dataclass(frozen=True)
class LoadConfig:
    concurrency: tuple[int, ...]
    tokens: int = 8192  # per document
    documents: int = 4  # distinct documents of the "different documents" workload
    questions: int = 2  # per client and level
    max_new_tokens: int = 32
    max_batch: int = 16
    threads: int | None = None
    model: str | None = None  # the tokenizer's; model_flags pass it (and the rest) to the services
    model_flags: tuple[str, ...] = ()
    unbatched_baseline: bool = True
    prefix_cache_mib: int | None = None  # the decoder's --prefix-cache-mib; None: its default


@dataclass
class Answered:
    """One request as the client saw it."""

    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between consecutive tokens
    tokens: int = 0
    refused: str | None = None  # the status code name when the call failed


def ask(decoder: DecoderClient, context_id: str, question: str, params: SamplingParams) -> Answered:
    answered = Answered()
    try:
        timed(decoder.generate(context_id, question, params), answered)
    except RemoteError as exc:
        answered.refused = exc.code.name
    return answered


def timed(events: Iterable[TokenDelta | Finished], answered: Answered) -> None:
    """Read an answer's events as they come: the time to its first token, the gaps between its
    tokens and their count. The events are produced lazily, so the clock starts at the request."""
    started = last = time.perf_counter()
    for event in events:
        if isinstance(event, TokenDelta) and event.token_id is not None:
            now = time.perf_counter()
            if answered.ttft_s is None:
                answered.ttft_s = now - started
            else:
                answered.gaps_s.append(now - last)
            last = now
            answered.tokens += 1
        elif isinstance(event, Finished):
            break


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(target: str, api_key: str, contexts: Sequence[str], clients: int, config: LoadConfig) -> dict[str, Any]:
    """`clients` clients at once, each asking config.questions questions; the level's figures."""
    params = free_generation(SamplingParams(max_new_tokens=config.max_new_tokens))
    barrier = threading.Barrier(clients)

    def client(index: int) -> list[Answered]:
        with DecoderClient(target, api_key=api_key, timeout_s=600) as decoder:
            barrier.wait(timeout=300)  # a client that cannot start breaks the barrier, not the run
            return [
                ask(decoder, contexts[index % len(contexts)], QUESTIONS[(index + n) % len(QUESTIONS)], params)
                for n in range(config.questions)
            ]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for per_client in pool.map(client, range(clients)) for a in per_client]
    return level_figures(clients, answers, time.perf_counter() - started)


def level_figures(clients: int, answers: Sequence[Answered], wall: float) -> dict[str, Any]:
    """A level's figures from its answers and its wall time."""
    served = [a for a in answers if a.refused is None]
    ttfts = [a.ttft_s for a in served if a.ttft_s is not None]
    gaps = [g for a in served for g in a.gaps_s]
    tokens = sum(a.tokens for a in served)
    refusals: dict[str, int] = {}
    for a in answers:
        if a.refused is not None:
            refusals[a.refused] = refusals.get(a.refused, 0) + 1
    return {
        "clients": clients,
        "requests": len(answers),
        "answered": len(served),
        "refused": refusals,
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "questions_per_s": round(len(served) / wall, 3),
        "ttft_p50_s": _round(percentile(ttfts, 0.5)),
        "ttft_p95_s": _round(percentile(ttfts, 0.95)),
        "itl_p50_s": _round(percentile(gaps, 0.5)),
        "itl_p95_s": _round(percentile(gaps, 0.95)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def measure_stack(
    workdir: Path, config: LoadConfig, documents: Sequence[list[int]], max_batch: int, levels: Sequence[int],
    progress: Callable[[str], None],
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Start the services with this batch size, store the documents, run every level of both workloads."""
    concurrent = max(levels)
    flags = ["--max-batch", str(max_batch), "--max-concurrent", str(concurrent), "--max-queued", str(concurrent)]
    if config.prefix_cache_mib is not None:
        flags += ["--prefix-cache-mib", str(config.prefix_cache_mib)]
    with grpc_stack(workdir, config.model_flags, config.threads, [TENANT], flags) as targets:
        api_key = targets.api_keys[TENANT]
        with CompressorClient(targets.compressor, api_key=api_key, timeout_s=1800) as compressor:
            contexts = [compressor.compress(ids, pin=True).context_id for ids in documents]
        with DecoderClient(targets.decoder, api_key=api_key, timeout_s=600) as decoder:
            ask(decoder, contexts[0], WARM_UP_QUESTION, free_generation(SamplingParams(max_new_tokens=32)))
        results: dict[str, list[dict[str, Any]]] = {workload: [] for workload in WORKLOADS}
        for clients in levels:
            for workload in WORKLOADS:
                chosen = contexts[:1] if workload == WORKLOADS[0] else contexts
                level = run_level(targets.decoder, api_key, chosen, clients, config)
                results[workload].append(level)
                progress(
                    f"max batch {max_batch}, {clients} clients, {workload}: {level['tokens_per_s']} tokens/s, "
                    f"first token p95 {level['ttft_p95_s']} s, refused {sum(level['refused'].values())}"
                )
    return results


def run_load(config: LoadConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole benchmark (see the module doc); a JSON-ready report."""
    from transformers import AutoTokenizer

    from sharedllm.common.model_loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(config.model)), local_files_only=True)
    text = document_tokens(tokenizer, config.tokens * config.documents)
    documents = [text[i * config.tokens : (i + 1) * config.tokens] for i in range(config.documents)]
    started = time.perf_counter()
    report: dict[str, Any] = {"setup": asdict(config), "machine": describe_machine(None)}
    with tempfile.TemporaryDirectory(prefix="sharedllm-load-") as tmp:
        if config.unbatched_baseline:
            progress("one client against a decoder without batching (--max-batch 0) ...")
            report["unbatched"] = measure_stack(Path(tmp) / "unbatched", config, documents, 0, [1], progress)
        progress(f"the decoder with batching (--max-batch {config.max_batch}) ...")
        report["batched"] = measure_stack(Path(tmp) / "batched", config, documents, config.max_batch,
                                          config.concurrency, progress)  # fmt: skip
    report["ratios"] = ratios(report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """Against one client on the batched decoder: aggregate tokens/s, and p95 latencies."""
    found: dict[str, Any] = {}
    for workload, levels in report["batched"].items():
        one = next((level for level in levels if level["clients"] == 1), None)
        if one is None:
            continue
        found[workload] = {
            level["clients"]: {
                "tokens_per_s": _ratio(level["tokens_per_s"], one["tokens_per_s"]),
                "ttft_p95": _ratio(level["ttft_p95_s"], one["ttft_p95_s"]),
                "itl_p95": _ratio(level["itl_p95_s"], one["itl_p95_s"]),
            }
            for level in levels
        }
        if "unbatched" in report:
            alone = report["unbatched"][workload][0]
            found[workload]["one client, batched / unbatched tokens/s"] = _ratio(
                one["tokens_per_s"], alone["tokens_per_s"]
            )
    return found


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def format_load(report: dict[str, Any]) -> str:
    """The concurrency table, one row per (workload, clients)."""
    lines = [
        "| workload | clients | tokens/s | x one client | questions/s | TTFT p50 / p95 (s) | ITL p50 / p95 (ms) "
        "| refused |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for source in ("unbatched", "batched"):
        for workload, levels in report.get(source, {}).items():
            for level in levels:
                ratio = report["ratios"].get(workload, {}).get(level["clients"], {}).get("tokens_per_s")
                label = workload if source == "batched" else f"{workload}, no batching"
                itl = [None if v is None else round(v * 1000, 1) for v in (level["itl_p50_s"], level["itl_p95_s"])]
                lines.append(
                    f"| {label} | {level['clients']} | {level['tokens_per_s']} | "
                    f"{'' if source != 'batched' or ratio is None else f'{ratio}x'} | {level['questions_per_s']} | "
                    f"{level['ttft_p50_s']} / {level['ttft_p95_s']} | {itl[0]} / {itl[1]} | "
                    f"{sum(level['refused'].values())} |"
                )
    return "\n".join(lines)
