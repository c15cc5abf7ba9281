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

from sharedllm.common.benchmark.measure import Answer, Stored
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2, compressor_pb2_grpc, decoder_pb2, decoder_pb2_grpc
from sharedllm.common.rpc.client import call_metadata, open_channel
from sharedllm.common.store import new_context_id


class RemoteSharedLLM:
    def __init__(self, compressor_target: str, decoder_target: str, max_new_tokens: int, api_key: str | None) -> None:
        self.metadata = call_metadata(api_key)
        self.channels = (open_channel(compressor_target), open_channel(decoder_target))
        self.compressor = compressor_pb2_grpc.CompressorServiceStub(self.channels[0])
        self.decoder = decoder_pb2_grpc.DecoderServiceStub(self.channels[1])
        self.max_new_tokens = max_new_tokens
        self.context_ids: list[str] = []

    def store(self, tokens: list[int]) -> Stored:
        options = compressor_pb2.CompressOptions(context_id=new_context_id(), pin=True)
        request = compressor_pb2.CompressRequest(token_ids=compressor_pb2.TokenIds(ids=tokens), options=options)
        started = time.perf_counter()
        context = self.compressor.Compress(request, metadata=self.metadata).context
        seconds = time.perf_counter() - started
        self.context_ids.append(context.context_id)
        timings = context.timings
        return Stored(
            seconds, context.stored_bytes, {"tree_s": timings.compress_seconds, "store_s": timings.store_seconds}
        )

    def ask(self, question: str) -> Answer:
        request = decoder_pb2.GenerateRequest(
            context_id=self.context_ids[-1], prompt=question, max_new_tokens=self.max_new_tokens
        )
        started = time.perf_counter()
        first: float | None = None
        generated = 0
        for response in self.decoder.Generate(request, metadata=self.metadata):
            if response.token_ids and first is None:
                first = time.perf_counter()
            generated += len(response.token_ids)
        end = time.perf_counter()
        first = first or end
        return Answer(first - started, end - first, generated)

    def __enter__(self) -> RemoteSharedLLM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:  # after a failure the services may be gone; their error is the one to report
            for context_id in self.context_ids:
                request = compressor_pb2.DeleteContextRequest(context_id=context_id)
                self.compressor.DeleteContext(request, metadata=self.metadata)
        for channel in self.channels:
            channel.close()
