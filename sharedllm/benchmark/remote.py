"""SharedLLM through the gRPC services and Redis, timed as a client meets it.

The document goes up as token ids (the same ids the embedded cell compresses, so the two paths
do the same work); times are wall-clock on the client: the Compress call, and from sending a
Generate request to the first streamed token. Each Compress names a fresh context id, so the
compressor computes it every time instead of handing back the context it stored for the same
document in an earlier repetition. Contexts are pinned while the cell runs (no expiry
mid-measurement) and deleted at the end, so Redis does not fill up across cells. No
peak memory here: the services' processes serve every cell, so their peaks are not a cell's.
"""

from __future__ import annotations

import time

from sharedllm.benchmark.measure import Answer, Stored
from sharedllm.common.engine.params import SamplingParams, free_generation
from sharedllm.common.engine.results import TokenDelta
from sharedllm.common.rpc.client import CompressorClient, DecoderClient
from sharedllm.common.store import new_context_id


class RemoteSharedLLM:
    def __init__(self, compressor_target: str, decoder_target: str, max_new_tokens: int, api_key: str | None) -> None:
        self.compressor = CompressorClient(compressor_target, api_key=api_key)
        self.decoder = DecoderClient(decoder_target, api_key=api_key)
        self.params = free_generation(SamplingParams(max_new_tokens=max_new_tokens))  # as the embedded cell decodes
        self.context_ids: list[str] = []

    def store(self, tokens: list[int]) -> Stored:
        started = time.perf_counter()
        outcome = self.compressor.compress(tokens, context_id=new_context_id(), pin=True)
        seconds = time.perf_counter() - started
        self.context_ids.append(outcome.context_id)
        details = {"tree_s": outcome.timings.compress_s, "store_s": outcome.timings.store_s}
        return Stored(seconds, outcome.stored_bytes, details)

    def ask(self, question: str) -> Answer:
        started = time.perf_counter()
        first: float | None = None
        generated = 0
        for event in self.decoder.generate(self.context_ids[-1], question, self.params):
            if isinstance(event, TokenDelta) and event.token_id is not None:
                first = first or time.perf_counter()
                generated += 1
        end = time.perf_counter()
        first = first or end
        return Answer(first - started, end - first, generated)

    def __enter__(self) -> RemoteSharedLLM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:  # after a failure the services may be gone; their error is the one to report
            for context_id in self.context_ids:
                self.compressor.delete(context_id)
        self.compressor.close()
        self.decoder.close()
