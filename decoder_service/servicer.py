"""DecoderService: protobuf in, ContextRuntime.generate in a worker thread, protobuf deltas out.

Generation runs one token per step in a worker (sharedllm.common.rpc.workers); when the client cancels
or its deadline passes, the worker stops before the next token. Tokens are counted where they
are produced, so GetServerInfo shows that decoding really stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc

from sharedllm.common.engine.params import MAX_STOP_CHARS, MAX_STOP_STRINGS, SAMPLING_FIELDS, SamplingParams
from sharedllm.common.engine.results import Citation, Finished, Passage, TokenDelta
from sharedllm.common.engine.scheduler import SchedulerStats
from sharedllm.common.errors import InvalidInput, StoreUnavailable
from sharedllm.common.generated.sharedllm.v1 import decoder_pb2 as pb
from sharedllm.common.generated.sharedllm.v1 import decoder_pb2_grpc as pb_grpc
from sharedllm.common.rpc.enums import FINISH_REASONS, GROUNDING_NAMES
from sharedllm.common.rpc.interceptor import current_tenant
from sharedllm.common.rpc.server import ServerState
from sharedllm.common.store.codec import tree_config_message
from sharedllm.common.store.decoded_cache import CacheStats
from sharedllm.common.telemetry import metrics


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    """Validation happens in the engine, which knows the window (InvalidInput names the field)."""
    fields = {name: getattr(request, name) for name in SAMPLING_FIELDS if request.HasField(name)}
    if request.grounding != pb.GROUNDING_UNSPECIFIED:
        if request.grounding not in GROUNDING_NAMES:
            names = ", ".join(pb.Grounding.Name(g) for g in GROUNDING_NAMES)
            raise InvalidInput(f"grounding must be one of {names}, got {request.grounding}")
        fields["grounding"] = GROUNDING_NAMES[request.grounding]
    return SamplingParams(**fields, stop=tuple(request.stop))


def context_ids(request: pb.GenerateRequest) -> str | list[str]:
    """The one context the request names, or the list it reads as one."""
    if not request.context_ids:
        return request.context_id
    if request.context_id:
        raise InvalidInput("set context_id or context_ids, not both")
    return list(request.context_ids)


def evidence_message(passage: Passage) -> pb.EvidencePassage:
    return pb.EvidencePassage(
        token_start=passage.token_start,
        token_end=passage.token_end,
        char_start=passage.char_start,
        char_end=passage.char_end,
        text=passage.text,
        score=passage.score,
        context_id=passage.context_id or "",
    )


def citation_message(citation: Citation) -> pb.Citation:
    message = pb.Citation(
        answer_start=citation.answer_start,
        answer_end=citation.answer_end,
        char_start=citation.char_start,
        char_end=citation.char_end,
        text=citation.text,
        context_id=citation.context_id or "",
    )
    if citation.evidence_index is not None:
        message.evidence_index = citation.evidence_index
    return message


def last_message(finished: Finished) -> pb.GenerateResponse:
    t, read = finished.timings, finished.context
    return pb.GenerateResponse(
        finish_reason=FINISH_REASONS[finished.reason],
        usage=pb.Usage(
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=finished.completion_tokens,
            context_tokens=read.tokens if read else 0,
            context_chunks=read.chunks if read else 0,
            context_bytes_read=read.bytes_read if read else 0,
            context_nodes_cached=read.cached_nodes if read else 0,
            evidence_tokens=finished.evidence_tokens,
        ),
        timings=pb.GenerateTimings(
            context_load_seconds=t.context_read_s,
            selection_seconds=t.selection_s,
            prefill_seconds=t.prefill_s,
            time_to_first_token_seconds=t.time_to_first_token_s,
            decode_seconds=t.decode_s,
            evidence_seconds=t.evidence_s,
        ),
        evidence=[evidence_message(p) for p in finished.evidence],
        citations=[citation_message(c) for c in finished.citations],
    )


def cache_counters(stats: CacheStats | None) -> dict[str, int]:
    if stats is None:
        return {}
    return {
        "decoded_cache_bytes": stats.bytes,
        "decoded_cache_capacity_bytes": stats.capacity_bytes,
        "decoded_cache_hits": stats.hits,
        "decoded_cache_misses": stats.misses,
    }


def batch_counters(stats: SchedulerStats | None) -> dict[str, int | float]:
    if stats is None:
        return {}
    return {
        "batch_rows": stats.rows,
        "last_batch_size": stats.last_batch,
        "last_step_seconds": stats.step_seconds,
        "batch_steps_total": stats.steps,
        "prefix_cache_bytes": stats.prefix_cache_bytes,
        "prefix_blocks_reused_total": stats.prefix_blocks_reused,
    }


class TokenCounter:
    """Tokens produced by every worker thread together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


class DecoderServicer(pb_grpc.DecoderServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._tokens = TokenCounter()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        runtime = self._state.runtime
        params = sampling_params(request)
        contexts = context_ids(request)
        tenant = current_tenant()

        def events() -> Iterator[TokenDelta | Finished]:  # runs in a worker thread
            for event in runtime.generate(
                contexts,
                request.prompt,
                params,
                tenant=tenant,
                retrieval=not request.disable_retrieval,
                evidence_tokens=request.evidence_tokens if request.HasField("evidence_tokens") else None,
                evidence_mode=request.evidence_mode if request.HasField("evidence_mode") else None,
            ):
                if isinstance(event, TokenDelta) and event.token_id is not None:
                    self._tokens.add(1)
                yield event

        async for event in self._state.workers.iterate(events):
            if isinstance(event, TokenDelta):
                ids = [] if event.token_id is None else [event.token_id]
                yield pb.GenerateResponse(text=event.text, token_ids=ids)
            else:
                metrics.observe_generate(event)
                yield last_message(event)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        runtime, config, workers = self._state.runtime, self._state.config, self._state.workers
        engine, tenant = runtime.engine, current_tenant()
        quota = runtime.quotas.of(tenant)
        try:
            usage = await asyncio.to_thread(runtime.store.usage, tenant)
        except StoreUnavailable:  # left out: the rest still helps diagnose why the store is unreachable
            usage = None
        tenant_usage = None
        if usage is not None:
            limits = {"max_contexts": quota.max_contexts or 0, "max_bytes": quota.max_bytes or 0}
            tenant_usage = pb.TenantUsage(
                tenant=tenant, contexts=usage.contexts, stored_bytes=usage.stored_bytes, **limits
            )
        return pb.GetServerInfoResponse(
            model_name=engine.loaded.name,
            model_fingerprint=runtime.fingerprints.model,
            adapter_fingerprint=runtime.fingerprints.adapter,
            adapter_trained=engine.trained,
            tree_config=tree_config_message(engine.adapter.config),
            limits=pb.ServerLimits(
                window_tokens=engine.window,
                max_document_tokens=engine.limits.max_document_tokens,
                max_prompt_chars=engine.limits.max_prompt_chars,
                max_stop_strings=MAX_STOP_STRINGS,
                max_stop_chars=MAX_STOP_CHARS,
                max_message_bytes=config.network.max_message_bytes,
                max_concurrent_requests=workers.limit,
                max_queued_requests=workers.max_queued,
                queue_timeout_seconds=workers.queue_timeout_s,
                max_batch=engine.scheduler.max_batch if engine.scheduler is not None else 0,
                max_contexts_per_question=engine.limits.max_contexts_per_question,
            ),
            stats=pb.ServerStats(
                active_requests=workers.active,
                requests_total=workers.started_total,
                generated_tokens_total=self._tokens.total,
                queued_requests=workers.queued,
                refused_requests_total=workers.refused_total,
                **cache_counters(runtime.cache.stats() if runtime.cache is not None else None),
                **batch_counters(engine.scheduler.stats() if engine.scheduler is not None else None),
            ),
            store_url=runtime.store.url,
            usage=tenant_usage,
        )
