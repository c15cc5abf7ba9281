"""CompressorService: protobuf in, ContextRuntime calls, protobuf out. Nothing else.

Errors are raised as sharedllm.common.errors classes and turned into status codes by the shared
interceptor; the tenant comes from the caller's API key, never from the request.
"""

from __future__ import annotations

import asyncio
import codecs
import math
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from sharedllm.common import process_memory
from sharedllm.common.config import node_index
from sharedllm.common.engine.results import AppendOutcome, CompressOutcome
from sharedllm.common.engine.token_budget import TokenBudget, max_document_bytes
from sharedllm.common.errors import ContextNotFound, InvalidInput
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2 as pb
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2_grpc as pb_grpc
from sharedllm.common.rpc.interceptor import current_tenant
from sharedllm.common.rpc.server import ServerState
from sharedllm.common.rpc.workers import ShouldStop, Stopped
from sharedllm.common.store import ContextInfo
from sharedllm.common.telemetry import metrics

MAX_TTL_S = 366 * 24 * 3600.0
T = TypeVar("T")


class DocumentUpload:
    """A document gathered from one message or many, refused as soon as it grows past a limit.

    Text is decoded and its tokens counted as pieces arrive (TokenBudget), so an upload over
    the token limit is refused after about one limit's worth of text, whatever its size.
    """

    def __init__(self, max_bytes: int, max_tokens: int, budget: TokenBudget) -> None:
        self._max_bytes = max_bytes
        self._max_tokens = max_tokens
        self._budget = budget
        self._kind: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._text: list[str] = []
        self._bytes = 0
        self._ids: list[int] = []

    def add(self, message: pb.CompressRequest | pb.CompressStreamRequest | pb.AppendContextRequest, oneof: str) -> None:
        kind = message.WhichOneof(oneof)
        if kind is None:
            return
        if self._kind not in (None, kind):
            raise InvalidInput(f"a document is sent as text or as token_ids, not both (got {self._kind}, then {kind})")
        self._kind = kind
        if kind == "text":
            self._add_text(message.text)
        else:
            self._ids += message.token_ids.ids
            if len(self._ids) > self._max_tokens:
                raise InvalidInput(f"document has at least {len(self._ids)} tokens; the limit is {self._max_tokens}")

    def _add_text(self, piece: bytes) -> None:
        if self._bytes + len(piece) > self._max_bytes:
            raise InvalidInput(
                f"document has at least {self._bytes + len(piece)} bytes; the limit is {self._max_bytes} "
                f"(for {self._max_tokens} tokens)"
            )
        try:
            text = self._decoder.decode(piece)
        except UnicodeDecodeError as exc:
            offset = self._bytes + exc.start  # within 3 bytes: the decoder may hold a character's start
            raise InvalidInput(f"document is not valid UTF-8 (invalid byte near offset {offset})") from None
        self._bytes += len(piece)
        self._text.append(text)
        self._budget.add(text)

    def document(self) -> str | list[int]:
        """The UTF-8 decoded text, or the token ids."""
        if self._kind is None:
            raise InvalidInput("document is empty: send text or token_ids")
        if self._kind == "token_ids":
            return self._ids
        try:
            self._text.append(self._decoder.decode(b"", final=True))
        except UnicodeDecodeError:
            raise InvalidInput("document is not valid UTF-8 (it ends inside a character)") from None
        self._budget.finish()
        return "".join(self._text)


def lifetime(options: pb.CompressOptions) -> dict[str, float | bool | None]:
    """The runtime's ttl_s and pin: the requested lifetime (None: the server's default), or pinned."""
    if options.pin:
        if options.HasField("ttl_seconds"):
            raise InvalidInput("set ttl_seconds or pin, not both")
        return {"ttl_s": None, "pin": True}
    if not options.HasField("ttl_seconds"):
        return {"ttl_s": None, "pin": False}
    ttl = options.ttl_seconds
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL_S):
        raise InvalidInput(f"ttl_seconds must be in (0, {MAX_TTL_S:.0f}], got {ttl!r}")
    return {"ttl_s": ttl, "pin": False}


def expires_in(info: ContextInfo) -> dict[str, float]:
    """The optional expires_in_seconds field: absent when the context does not expire."""
    return {} if info.expires_in_s is None else {"expires_in_seconds": info.expires_in_s}


def compressed_context(outcome: CompressOutcome, total_s: float) -> pb.CompressedContext:
    t = outcome.timings
    return pb.CompressedContext(
        context_id=outcome.context_id,
        reused=outcome.reused,
        document_tokens=outcome.n_tokens,
        chunks=outcome.chunks,
        stored_bytes=outcome.stored_bytes,
        compression_ratio=outcome.compression_ratio,
        bytes_per_token=outcome.bytes_per_token,
        kv_cache_ratio=outcome.kv_cache_ratio,
        timings=pb.CompressTimings(
            tokenize_seconds=t.tokenize_s,
            compress_seconds=t.compress_s,
            store_seconds=t.store_s,
            total_seconds=total_s,
        ),
    )


def tree_levels(info: ContextInfo) -> list[pb.TreeLevel]:
    """Nodes and stored entries of each level, over all chunks (the tree's outline)."""
    m = info.manifest
    counts, per_chunk = m.node_entry_counts, m.nodes_per_chunk
    return [
        pb.TreeLevel(
            level=level,
            nodes=m.n_chunks * 2**level,
            entries=sum(
                counts[chunk * per_chunk + node_index(level, position)]
                for chunk in range(m.n_chunks)
                for position in range(2**level)
            ),
        )
        for level in range(1, m.tree_config.depth + 1)
    ]


def _abandon_if(should_stop: ShouldStop) -> Callable[[int, int], None]:
    """A progress callback that stops the lower model between chunk batches once the caller left."""

    def progress(done: int, total: int) -> None:
        if should_stop():
            raise Stopped(f"compression abandoned after {done} of {total} chunks: the caller left")

    return progress


class CompressorServicer(pb_grpc.CompressorServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self._state = state
        # Uploads count their tokens in threads, no more at once than calls may compress.
        self._counting = asyncio.Semaphore(state.config.network.max_concurrent)

    async def _in_thread(self, call: Callable[..., T], *args: object) -> T:
        async with self._counting:
            return await asyncio.to_thread(call, *args)

    def _upload(self) -> DocumentUpload:
        engine = self._state.runtime.engine
        max_tokens = engine.limits.max_document_tokens
        max_bytes = self._state.config.store.max_document_bytes or max_document_bytes(max_tokens)
        return DocumentUpload(max_bytes, max_tokens, engine.token_budget())

    async def Compress(self, request: pb.CompressRequest, context: grpc.aio.ServicerContext) -> pb.CompressResponse:
        started = time.perf_counter()
        upload = self._upload()
        await self._in_thread(upload.add, request, "document")  # counting tokens takes a while
        document = await self._in_thread(upload.document)
        return pb.CompressResponse(context=await self._compress(document, request.options, started))

    async def CompressStream(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.CompressStreamResponse:
        started = time.perf_counter()
        upload = self._upload()
        options: pb.CompressOptions | None = None
        async for message in request_iterator:
            if options is None:
                options = message.options
            elif message.HasField("options"):
                raise InvalidInput("options belong in the first message of the stream only")
            await self._in_thread(upload.add, message, "piece")
        document = await self._in_thread(upload.document)
        return pb.CompressStreamResponse(context=await self._compress(document, options, started))

    async def AppendContext(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.AppendContextResponse:
        started = time.perf_counter()
        upload = self._upload()
        context_id: str | None = None
        async for message in request_iterator:
            if context_id is None:
                context_id = message.context_id
            elif message.context_id:
                raise InvalidInput("context_id belongs in the first message of the stream only")
            await self._in_thread(upload.add, message, "piece")
        if context_id is None:
            raise InvalidInput("the stream is empty: its first message names the context")
        addition = await self._in_thread(upload.document)
        runtime, tenant = self._state.runtime, current_tenant()

        def work(should_stop: ShouldStop) -> AppendOutcome:
            try:
                if isinstance(addition, str):
                    return runtime.append_text(context_id, addition, tenant=tenant, progress=_abandon_if(should_stop))
                return runtime.append_ids(context_id, addition, tenant=tenant, progress=_abandon_if(should_stop))
            finally:
                process_memory.give_back()

        outcome = await self._state.workers.call(work)
        metrics.observe_compress(outcome.encoded_tokens, outcome.bytes_written, outcome.context.timings)
        return pb.AppendContextResponse(
            context=compressed_context(outcome.context, time.perf_counter() - started),
            encoded_tokens=outcome.encoded_tokens,
            kept_chunks=outcome.kept_chunks,
            encoded_chunks=outcome.encoded_chunks,
            bytes_written=outcome.bytes_written,
        )

    async def _compress(
        self, document: str | list[int], options: pb.CompressOptions, started: float
    ) -> pb.CompressedContext:
        runtime = self._state.runtime
        kwargs = {
            "tenant": current_tenant(),
            "context_id": options.context_id if options.HasField("context_id") else None,
            **lifetime(options),
        }

        def work(should_stop: ShouldStop) -> CompressOutcome:
            progress = _abandon_if(should_stop)
            try:
                if isinstance(document, str):  # its tokens were counted on arrival
                    return runtime.compress_text(document, counted=True, progress=progress, **kwargs)
                return runtime.compress_ids(document, progress=progress, **kwargs)
            finally:
                process_memory.give_back()  # activations and the encoded context are freed by now

        outcome = await self._state.workers.call(work)
        metrics.observe_compress(outcome.n_tokens, outcome.stored_bytes, outcome.timings)
        return compressed_context(outcome, time.perf_counter() - started)

    async def GetContext(
        self, request: pb.GetContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetContextResponse:
        runtime = self._state.runtime
        info = await asyncio.to_thread(runtime.store.info, request.context_id, tenant=current_tenant())
        m = info.manifest
        return pb.GetContextResponse(
            context_id=info.context_id,
            model_fingerprint=m.model_fingerprint,
            adapter_fingerprint=m.adapter_fingerprint,
            compatible=(m.model_fingerprint, m.adapter_fingerprint)
            == (runtime.fingerprints.model, runtime.fingerprints.adapter),
            tree_config=m.tree_config,
            document_tokens=m.n_tokens,
            chunk_lengths=m.chunk_lengths,
            levels=tree_levels(info),
            stored_bytes=info.stored_bytes,
            created_unix_ms=m.created_unix_ms,
            **expires_in(info),
        )

    async def DeleteContext(
        self, request: pb.DeleteContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteContextResponse:
        store = self._state.runtime.store
        if not await asyncio.to_thread(store.delete, request.context_id, tenant=current_tenant()):
            raise ContextNotFound(f"context {request.context_id!r} not found (never stored, expired or deleted)")
        return pb.DeleteContextResponse()

    async def TouchContext(
        self, request: pb.TouchContextRequest, context: grpc.aio.ServicerContext
    ) -> pb.TouchContextResponse:
        store, tenant = self._state.runtime.store, current_tenant()
        await asyncio.to_thread(store.touch, request.context_id, tenant=tenant, pin=request.pin)
        info = await asyncio.to_thread(store.info, request.context_id, tenant=tenant)
        return pb.TouchContextResponse(**expires_in(info))
