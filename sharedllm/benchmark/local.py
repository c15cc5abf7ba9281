"""The methods measured in the cell's own process, on one loaded engine (one copy of the weights).

- `sharedllm`: embedded mode, the ContextRuntime over an in-process store, as `sharedllm ask` runs;
- `full`: full attention, the whole document prefilled through every layer into a KV cache that
  is kept, so a question costs its own prefill over the cached document (the strongest form of the
  baseline; without the cache a repeat question re-reads the document, which is what its first
  question costs, so the runner takes that number for the stateless variant);
- `streaming`: StreamingLLM, the document streamed through a sink cache whose state after the
  document is kept and copied for each question (a question would otherwise evict it).

Beyond the model's window, full attention is timed for its cost only; its answers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers.utils import logging as hf_logging

from sharedllm.benchmark.measure import WARM_UP_TOKENS, Answer, Method, Stored, measure, warm_up
from sharedllm.common.baselines.streaming import DEFAULT_SINKS, StreamingLLM
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.generation import Step, decode
from sharedllm.common.engine.llama import LlamaBody
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.engine.results import Finished, run_to_end
from sharedllm.common.model_loading import dtype_from_name
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import full_kv_cache_bytes, new_context_id, open_store
from sharedllm.common.telemetry.memory import PeakMemory, resident_bytes

PROMPT_ROOM = 512  # cache slots kept after the document for a question's prompt (questions are short)


def _sync(body: LlamaBody) -> None:
    """Wait for queued GPU work, so the clock reads the end of the work and not of its launch."""
    if body.device.type == "cuda":
        torch.cuda.synchronize(body.device)


def _kv_bytes(body: LlamaBody, n_tokens: int) -> int:
    return full_kv_cache_bytes(
        n_tokens=n_tokens,
        n_layers=body.n_layers,
        n_kv_heads=body.n_kv,
        head_dim=body.head_dim,
        dtype_bytes=body.dtype.itemsize,
    )


def _ids(body: LlamaBody, tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=body.device)


def greedy_answer(engine: Engine, step: Step, question: str, max_new_tokens: int, started: float) -> Answer:
    """A baseline's answer through the engine's own decode loop (generation.decode), so every
    method stops, samples and is timed by the same rule; `started`: the question's arrival."""
    params = free_generation(SamplingParams(max_new_tokens=max_new_tokens))
    prompt = engine.prompt_ids(question)
    body = engine.body
    events = decode(
        lambda ids: body.logits(step(ids)), prompt, params, engine.decoder.eos_ids, engine.decode_text, body.device
    )
    return answer_of(run_to_end(events), time.perf_counter() - started)


def answer_of(finished: Finished, lead_s: float = 0.0) -> Answer:
    """lead_s: time from the question's arrival to the start of decoding, not in the Finished's timings."""
    t = finished.timings
    return Answer(lead_s + t.time_to_first_token_s, t.decode_s, finished.completion_tokens)


class EmbeddedSharedLLM:
    def __init__(self, engine: Engine, max_new_tokens: int) -> None:
        self.runtime = ContextRuntime(engine, open_store("memory://"))
        self.params = free_generation(SamplingParams(max_new_tokens=max_new_tokens))  # decodes as the baselines do
        self.context_id: str | None = None

    def store(self, tokens: list[int]) -> Stored:
        # A fresh id each repetition: without one the runtime would hand back the stored context.
        outcome = self.runtime.compress_ids(tokens, context_id=new_context_id())
        self.context_id = outcome.context_id
        t = outcome.timings
        return Stored(t.total_s, outcome.stored_bytes, {"tree_s": t.compress_s, "store_s": t.store_s})

    def ask(self, question: str) -> Answer:
        return answer_of(run_to_end(self.runtime.generate(self.context_id, question, self.params)))


class FullAttention:
    def __init__(self, engine: Engine, max_new_tokens: int) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens

    def store(self, tokens: list[int]) -> Stored:
        body = self.engine.body
        started = time.perf_counter()
        self.cache = body.new_cache(len(tokens) + PROMPT_ROOM + self.max_new_tokens)
        self.engine.decoder.forward(_ids(body, tokens), 0, self.cache, None)
        _sync(body)
        self.document_tokens = len(tokens)
        return Stored(time.perf_counter() - started, _kv_bytes(body, len(tokens)))

    def _step(self, tokens: list[int]) -> torch.Tensor:
        return self.engine.decoder.forward(_ids(self.engine.body, tokens), self.cache.length, self.cache, None)[0, -1]

    def ask(self, question: str) -> Answer:
        started = time.perf_counter()
        self.cache.length = self.document_tokens  # forget the previous question and answer
        return greedy_answer(self.engine, self._step, question, self.max_new_tokens, started)


class Streaming:
    def __init__(self, engine: Engine, max_new_tokens: int) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.llm = StreamingLLM(engine.body, engine.window - DEFAULT_SINKS)

    def store(self, tokens: list[int]) -> Stored:
        started = time.perf_counter()
        self.cache = self.llm.new_cache()
        self.llm.feed(self.cache, tokens)
        _sync(self.engine.body)
        return Stored(time.perf_counter() - started, _kv_bytes(self.engine.body, self.cache.length))

    def ask(self, question: str) -> Answer:
        started = time.perf_counter()
        cache = copy.deepcopy(self.cache)  # the question evicts; the stored state must survive it
        return greedy_answer(self.engine, lambda ids: self.llm.feed(cache, ids), question, self.max_new_tokens, started)


METHODS: dict[str, Callable[[Engine, int], Method]] = {
    "sharedllm": EmbeddedSharedLLM,
    "full": FullAttention,
    "streaming": Streaming,
}


def lower_forward_seconds(engine: Engine, tokens: list[int]) -> float:
    """The compressor's floor: embeddings and layers 0..M-1 over the compressor's own chunk batches,
    and nothing else (no keys/values kept, no pooling, no tree, no encoding, no store).

    It is a single pass over each chunk, so it is the floor of `single_pass` encoding; `per_node`
    encodes every level again and costs about D times as much by design.
    """
    compressor, body = engine.compressor, engine.body
    chunks = compressor.chunk(tokens)
    layers = range(compressor.config.n_layers)
    started = time.perf_counter()
    for first in range(0, len(chunks), compressor.batch_chunks):
        batch = [torch.tensor(chunk, dtype=torch.long) for chunk in chunks[first : first + compressor.batch_chunks]]
        ids = pad_sequence(batch, batch_first=True).to(body.device)
        positions = torch.arange(ids.shape[1], device=body.device).expand(ids.shape[0], -1)
        body.forward_layers(body.embed(ids), positions, layers)
    _sync(body)
    return time.perf_counter() - started


def describe(engine: Engine, method: Method) -> dict[str, Any]:
    """What the cell ran: the model, the adapter's tree, device, dtype, threads (and the sink cache)."""
    body = engine.body
    info: dict[str, Any] = {
        "model": engine.loaded.name,
        "tree_config": engine.adapter.config.to_dict(),
        "adapter_trained": engine.trained,
        "device": str(body.device),
        "dtype": str(body.dtype).removeprefix("torch."),
        "window": engine.window,
        "torch_threads": torch.get_num_threads(),
    }
    if isinstance(method, Streaming):
        info["streaming"] = {"sinks": method.llm.sinks, "recent": method.llm.recent, "piece": method.llm.piece}
    return info


def measure_local(args: argparse.Namespace, tokens: list[int]) -> dict[str, Any]:
    """Load, warm up, then measure with the peak memory reset in between: the cell's `engine` and `metrics`.

    SharedLLM's cell also times the bare lower-layer forward, before the compressor on even
    repetitions and after it on odd ones, so neither always runs on a warmer machine.
    """
    hf_logging.disable_progress_bar()  # weight-loading bars would bury a failing cell's error line
    engine = Engine.load(args.model, args.adapter, args.device, dtype=dtype_from_name(args.dtype))
    method = METHODS[args.method](engine, args.max_new_tokens)
    with_floor = args.method == "sharedllm"
    floor_first = args.repeat % 2 == 0
    floor_s = None
    with torch.inference_mode():
        warm_up(method, tokens)
        if with_floor:
            lower_forward_seconds(engine, tokens[:WARM_UP_TOKENS])
        resident = resident_bytes()
        peak = PeakMemory(str(engine.body.device))
        peak.reset()
        if with_floor and floor_first:
            floor_s = lower_forward_seconds(engine, tokens)
        metrics = measure(method, tokens)
        if with_floor and not floor_first:
            floor_s = lower_forward_seconds(engine, tokens)
        metrics.update(peak.read())
    if floor_s is not None:
        metrics["floor_s"] = floor_s
    metrics["resident_after_load_bytes"] = resident
    return {"engine": describe(engine, method), "metrics": metrics}
