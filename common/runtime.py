"""Compress-then-generate over a store: what the CLI, the gRPC services and batch jobs call.

It joins the engine (tensors) and a store (bytes) and speaks only in ids, text, token ids
and numbers, so the front ends above it never see a tensor or a protobuf payload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from opentelemetry import trace

from sharedllm.common.engine.documents import JoinedContexts
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.evidence import PassageIndex
from sharedllm.common.engine.params import EvidenceSettings, SamplingParams
from sharedllm.common.engine.results import (
    AppendOutcome,
    CompressOutcome,
    CompressTimings,
    ContextRead,
    Finished,
    TokenDelta,
)
from sharedllm.common.errors import ContextChanged, ContextNotFound, DataCorruption, IncompatibleContext, InvalidInput
from sharedllm.common.generated.sharedllm.v1 import context_pb2 as pb
from sharedllm.common.store import (
    DEFAULT_TENANT,
    ContextStore,
    Fingerprints,
    Quota,
    TenantQuotas,
    codec,
    content_context_id,
    encode,
    storage_report,
    validate_name,
)
from sharedllm.common.store.base import StoredContext
from sharedllm.common.store.codec import FORMAT_VERSION
from sharedllm.common.store.decoded_cache import DEFAULT_CACHE_BYTES, DecodedCache
from sharedllm.common.telemetry import tracing

ProgressFn = Callable[[int, int], None]
APPEND_ATTEMPTS = 8  # an append that keeps losing races to other writers of its context gives up (ABORTED)
WARM_UP_TEXT = "A short text that runs every part of the model once before the first request."


class PassageIndexCache:
    """The passage indexes of recently asked documents, so a repeat question does not rebuild one.

    Keyed by tenant, the verified digest of the context's index part (which covers its token
    ids) and the passage size: content-addressed like the decoded cache, so never stale.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, bytes, int], PassageIndex] = OrderedDict()

    def get(self, key: tuple[str, bytes, int], build: Callable[[], PassageIndex]) -> PassageIndex:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        index = build()  # outside the lock: building takes a while and other requests go on
        with self._lock:
            self._entries[key] = index
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return index


def source_digest(token_ids: list[int]) -> bytes:
    """SHA-256 over the canonical bytes of the document (its token ids, little-endian uint32)."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<u4").tobytes()).digest()


class ContextRuntime:
    """One engine and one store, shared by concurrent requests.

    Forward passes keep no state in the model (each request has its own KV cache and
    injection), so requests may run in parallel threads; how many is the server's limit.
    Verified nodes and retrieval keys stay decoded in a bounded cache (decoded_cache_bytes, 0:
    none), so repeat questions about a document neither re-read nor re-verify them.
    """

    def __init__(
        self,
        engine: Engine,
        store: ContextStore,
        default_ttl_s: float | None = 24 * 3600,
        decoded_cache_bytes: int = DEFAULT_CACHE_BYTES,
        evidence: EvidenceSettings | None = None,
        quotas: TenantQuotas | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.default_ttl_s = default_ttl_s
        self.quotas = quotas or TenantQuotas()
        self.cache = DecodedCache(decoded_cache_bytes) if decoded_cache_bytes > 0 else None
        # Kept with the decoded cache (and off with it): both serve repeat questions about a document.
        self.passage_indexes = PassageIndexCache() if decoded_cache_bytes > 0 else None
        self.evidence = evidence or EvidenceSettings()
        self.fingerprints = Fingerprints(model=engine.loaded.fingerprint, adapter=engine.adapter.fingerprint())

    def warm_up(self) -> None:
        """Compress (and answer, unless the engine holds only the compressor's layers) once without
        storing anything, so a server's first request pays no one-time costs (lazy initialisation,
        first allocations)."""
        tree = self.engine.compress(self.engine.tokenize_document(WARM_UP_TEXT)).tree
        if not self.engine.lower_only:
            # Written, not quoted: a quote would run no model step.
            for _ in self.engine.generate(tree, WARM_UP_TEXT, SamplingParams(max_new_tokens=1, grounding="facts")):
                pass

    def compress_text(self, text: str, counted: bool = False, **kwargs) -> CompressOutcome:
        """compress_ids on the text's tokens; counted=True: its tokens were counted as it arrived."""
        started = time.perf_counter()
        with tracing.span("tokenize", characters=len(text)):
            ids = self.engine.tokenize_document(text, counted)
        tokenized = time.perf_counter() - started
        outcome = self.compress_ids(ids, **kwargs)
        timings = dataclasses.replace(
            outcome.timings, tokenize_s=tokenized, total_s=outcome.timings.total_s + tokenized
        )
        return dataclasses.replace(outcome, timings=timings)

    def compress_ids(
        self,
        token_ids: list[int],
        *,
        tenant: str = DEFAULT_TENANT,
        context_id: str | None = None,
        ttl_s: float | None = None,
        pin: bool = False,
        progress: ProgressFn | None = None,
    ) -> CompressOutcome:
        """Compress and store. The context expires ttl_s after each use (None: the runtime's
        default lifetime); pin=True: it never expires.

        Without a context_id the id derives from the tenant, model, adapter and document, so the
        same document compressed again reuses what is stored (CompressOutcome.reused) instead of
        storing it twice; a caller that names its context_id always gets a fresh compression.
        """
        started = time.perf_counter()
        # Names first: a malformed id must not cost a whole compression before it is refused.
        validate_name(tenant, "tenant")
        if context_id is not None:
            validate_name(context_id, "context id")
        self.engine.check_token_ids(token_ids)
        lifetime_s = None if pin else self.default_ttl_s if ttl_s is None else ttl_s
        digest = source_digest(token_ids)
        if context_id is None:
            context_id = self._content_id(tenant, digest)
            reused = self._reuse(context_id, tenant, digest, lifetime_s, started)
            if reused is not None:
                return reused
        quota = self._room_for(tenant, context_id)
        with tracing.span("compress", tenant=tenant, tokens=len(token_ids)) as current:
            with tracing.span("lower model and pooling", tokens=len(token_ids)):
                compressed = self.engine.compress(token_ids, progress)
            t_store = time.perf_counter()
            encoded = encode(
                compressed.tree,
                fingerprints=self.fingerprints,
                base_n_layers=self.engine.loaded.base_n_layers,
                tenant=tenant,
                source_sha256=digest,
                ttl_s=lifetime_s,
            )
            with tracing.span("store write", bytes=encoded.nbytes):
                self.store.put(context_id, encoded, quota)
            done = time.perf_counter()
            current.set_attributes(
                {"context_id": context_id, "chunks": compressed.tree.n_chunks, "bytes": encoded.nbytes}
            )
            timings = CompressTimings(compress_s=compressed.seconds, store_s=done - t_store, total_s=done - started)
            return self._outcome(context_id, False, encoded.manifest, encoded.nbytes, timings)

    def append_text(self, context_id: str, text: str, **kwargs) -> AppendOutcome:
        """append on text: it joins the stored document's end as it is (append.py)."""
        return self._append(context_id, text=text, **kwargs)

    def append_ids(self, context_id: str, token_ids: list[int], **kwargs) -> AppendOutcome:
        """append on token ids, placed after the stored ones."""
        return self._append(context_id, ids=token_ids, **kwargs)

    def _append(
        self,
        context_id: str,
        *,
        text: str | None = None,
        ids: list[int] | None = None,
        tenant: str = DEFAULT_TENANT,
        progress: ProgressFn | None = None,
    ) -> AppendOutcome:
        """Grow a stored context: its last chunk encoded again with the new text, new chunks added,
        every other chunk kept as stored (not read, not written). The result is a new version under
        the same id with the same lifetime (or pin) and its own source hash; it replaces the version
        read only if that is still the current one, so of two appends racing, the one that loses
        reads the winner's version and appends to it (APPEND_ATTEMPTS times at most): none is lost.
        """
        started = time.perf_counter()
        validate_name(tenant, "tenant")
        validate_name(context_id, "context id")
        self.engine.check_addition(text=text, ids=ids)  # before any read: a bad addition touches nothing
        for _ in range(APPEND_ATTEMPTS):
            outcome = self._append_once(context_id, tenant, text, ids, progress, started)
            if outcome is not None:
                return outcome
        raise ContextChanged(
            f"context {context_id!r} changed under {APPEND_ATTEMPTS} appends in a row (other writers); try again"
        )

    def _append_once(
        self,
        context_id: str,
        tenant: str,
        text: str | None,
        ids: list[int] | None,
        progress: ProgressFn | None,
        started: float,
    ) -> AppendOutcome | None:
        """One try of _append on the current version; None when another writer replaced it first."""
        info = self.store.info(context_id, tenant=tenant)  # not a use: a refused append changes nothing
        if context_id == self._content_id(tenant, info.manifest.source_sha256):
            raise InvalidInput(
                f"context {context_id!r} is named by its document's content (it was compressed without an "
                "id), and another document under that name would break deduplication; compress it with "
                "a context id of your own to grow it"
            )
        base = self.store.open(context_id, self.fingerprints, tenant=tenant)
        stored = base.token_ids.tolist()
        plan = self.engine.plan_append(stored, base.chunk_lengths, text=text, ids=ids)
        quota = self._room_for(tenant, context_id)
        with tracing.span("append", tenant=tenant, context_id=context_id, tokens=len(plan.tail_ids)):
            with tracing.span("lower model and pooling", tokens=len(plan.tail_ids)):
                compressed = self.engine.compress(plan.tail_ids, progress)
            t_store = time.perf_counter()
            lifetime_ms = codec.lifetime_ms(base.manifest)
            encoded = codec.extend(
                base.manifest,
                base.retrieval_keys,
                base.token_ids,
                plan.kept_chunks,
                compressed.tree,
                source_sha256=source_digest(stored[: plan.kept_tokens] + plan.tail_ids),
                ttl_s=None if info.expires_in_s is None or lifetime_ms is None else lifetime_ms / 1000,
            )
            try:
                with tracing.span("store write", bytes=encoded.written_bytes):
                    self.store.put(context_id, encoded, quota, replaces=base.version)
            except ContextChanged:
                return None  # another append (or a replace) won the race: read its version, append to it
        done = time.perf_counter()
        timings = CompressTimings(compress_s=compressed.seconds, store_s=done - t_store, total_s=done - started)
        return AppendOutcome(
            context=self._outcome(context_id, False, encoded.manifest, encoded.nbytes, timings),
            encoded_tokens=len(plan.tail_ids),
            kept_chunks=plan.kept_chunks,
            encoded_chunks=compressed.tree.n_chunks,
            bytes_written=encoded.written_bytes,
        )

    def _room_for(self, tenant: str, context_id: str) -> Quota:
        """The tenant's quota, checked before spending a compression: a store that is gone or full,
        or a tenant at its quota, would refuse the write anyway (the context this write replaces,
        if any, does not count)."""
        self.store.ping(writes=True)
        quota = self.quotas.of(tenant)
        if quota.limited:
            quota.check(tenant, self.store.usage(tenant, excluding=context_id), 0)
        return quota

    def _content_id(self, tenant: str, digest: bytes) -> str:
        """The id of a document as this runtime stores it: everything the stored bytes depend on
        (model, adapter with its tree, the compressor's dtype, the format, the tokens)."""
        fp = self.fingerprints
        setup = f"compress\0{fp.model}\0{fp.adapter}\0{self.engine.body.dtype}\0{FORMAT_VERSION}\0"
        return content_context_id(tenant, setup.encode() + digest)

    def _reuse(
        self, context_id: str, tenant: str, digest: bytes, lifetime_s: float | None, started: float
    ) -> CompressOutcome | None:
        """The stored context of the same document, if it lives at least as long as asked (its
        expiry restarted, or removed when asked to pin); None: compress it (again)."""
        try:
            info = self.store.info(context_id, tenant=tenant)
        except (ContextNotFound, IncompatibleContext, DataCorruption):
            return None  # absent, or unusable: a fresh compression replaces it
        if info.manifest.source_sha256 != digest:
            return None  # another document a caller stored under this id by name: replaced
        stored_ms = codec.lifetime_ms(info.manifest)
        if lifetime_s is not None and stored_ms is not None and stored_ms < lifetime_s * 1000:
            return None  # stored to live shorter than asked: store it anew with the longer lifetime
        try:
            self.store.touch(context_id, tenant=tenant, pin=lifetime_s is None and stored_ms is not None)
        except ContextNotFound:
            return None  # expired between the two calls
        done = time.perf_counter()
        return self._outcome(
            context_id, True, info.manifest, info.stored_bytes, CompressTimings(total_s=done - started)
        )

    def _outcome(
        self, context_id: str, reused: bool, manifest: pb.ContextManifest, stored_bytes: int, timings: CompressTimings
    ) -> CompressOutcome:
        report = storage_report(manifest, stored_bytes)
        cfg = self.engine.adapter.config
        n_tokens, chunks = manifest.n_tokens, manifest.n_chunks
        entries = chunks * cfg.selected_per_chunk * cfg.pool_size
        return CompressOutcome(
            context_id=context_id,
            reused=reused,
            n_tokens=n_tokens,
            chunks=chunks,
            stored_bytes=stored_bytes,
            bytes_per_token=report.bytes_per_token,
            kv_cache_ratio=report.kv_cache_ratio,
            compression_ratio=n_tokens / max(1, min(entries, n_tokens)),
            timings=timings,
        )

    def _open(self, ids: tuple[str, ...], tenant: str) -> StoredContext | JoinedContexts:
        """One context, or several read as one. A list is checked whole before any is opened (an
        open is a use, which restarts a context's expiry): an unknown id, a context of another
        model or adapter, or a list past the limits is refused and changes nothing."""
        if len(ids) == 1:
            return self.store.open(ids[0], self.fingerprints, tenant=tenant, cache=self.cache)
        self.engine.check_context_list(ids)  # count and repeats, before any read
        manifests = [self.store.info(context_id, tenant=tenant).manifest for context_id in ids]
        for context_id, manifest in zip(ids, manifests, strict=True):
            codec.check_fingerprints(manifest, self.fingerprints, context_id)
        self.engine.check_joined(ids, [m.n_tokens for m in manifests], [m.n_chunks for m in manifests])
        parts = [self.store.open(c, self.fingerprints, tenant=tenant, cache=self.cache) for c in ids]
        # Again on what was opened: an append may have landed between the two reads.
        self.engine.check_joined(ids, [sum(p.chunk_lengths) for p in parts], [len(p.chunk_lengths) for p in parts])
        return JoinedContexts(parts, ids)

    def evidence_settings(self, tokens: int | None = None, mode: str | None = None) -> EvidenceSettings:
        """The runtime's evidence settings with a request's overrides (replace validates them: InvalidInput)."""
        changes = {k: v for k, v in (("tokens", tokens), ("mode", mode)) if v is not None}
        return dataclasses.replace(self.evidence, **changes)

    def generate(
        self,
        context_id: str | Sequence[str] | None,
        question: str,
        params: SamplingParams,
        *,
        tenant: str = DEFAULT_TENANT,
        retrieval: bool = True,
        evidence_tokens: int | None = None,
        evidence_mode: str | None = None,
    ) -> Iterator[TokenDelta | Finished]:
        """Stream the answer; the Finished at the end says what was read (Finished.context).

        context_id: one context, or a list of them read as one (documents.py: chunk positions in
        the order given, one evidence ranking over all, each passage naming its context). The
        manifest, retrieval keys and token ids are read first; only the nodes the question
        selects are fetched (by the decoder, through the StoredContext). evidence_tokens and
        evidence_mode override the runtime's evidence settings for this request (None: keep).
        """
        ids = (context_id,) if isinstance(context_id, str) else None if context_id is None else tuple(context_id)
        with tracing.span("generate", tenant=tenant, context_id=",".join(ids or ())) as current:
            started, started_ns = time.perf_counter(), time.time_ns()
            evidence = self.evidence_settings(evidence_tokens, evidence_mode)
            self.engine.check_request(question, params)  # before any store read or TTL refresh
            source = index = None
            if ids is not None:
                with tracing.span("context open", contexts=len(ids)):
                    source = self._open(ids, tenant)
                current.add_event(
                    "context loaded", {"tokens": sum(source.chunk_lengths), "chunks": len(source.chunk_lengths)}
                )
            opened = time.perf_counter() - started
            index_s = 0.0
            if source is not None and evidence.tokens > 0 and self.passage_indexes is not None:
                key = (tenant, source.index_digest, evidence.passage_tokens)
                index = self.passage_indexes.get(
                    key, lambda: self.engine.passage_index(source, evidence.passage_tokens)
                )
                index_s = time.perf_counter() - started - opened
            first_token_s: float | None = None
            events = self.engine.generate(
                source, question, params, retrieval=retrieval, evidence=evidence, index=index, scope=tenant
            )
            for event in events:
                if isinstance(event, TokenDelta):
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - started
                        current.add_event("first token")
                    yield event
                    continue
                # Times as the caller meets them: from the request's start, store reads included.
                if first_token_s is None:  # the first token was EOS: nothing streamed before the end
                    first_token_s = time.perf_counter() - started
                timings = dataclasses.replace(
                    event.timings,
                    context_open_s=opened,
                    evidence_s=event.timings.evidence_s + index_s,
                    time_to_first_token_s=first_token_s,
                )
                context = None
                if source is not None:
                    context = ContextRead(
                        tokens=sum(source.chunk_lengths),
                        chunks=len(source.chunk_lengths),
                        bytes_read=source.bytes_read,
                        cached_nodes=source.cached_nodes,
                    )
                finished = dataclasses.replace(event, timings=timings, context=context)
                _record(current, finished, started_ns + int(opened * 1e9))
                yield finished


def _record(current: trace.Span, finished: Finished, engine_start_ns: int) -> None:
    """What an answer read and produced, on its span, and the engine's phases as child spans
    (measured by the engine, laid end to end from when the context was open)."""
    t = finished.timings
    current.set_attributes(
        {
            "prompt_tokens": finished.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "evidence_tokens": finished.evidence_tokens,
            "finish_reason": finished.reason,
            **(
                {"bytes_read": finished.context.bytes_read, "cached_nodes": finished.context.cached_nodes}
                if finished.context is not None
                else {}
            ),
        }
    )
    tracing.phases(
        engine_start_ns,
        [
            ("passage selection", t.evidence_s),
            ("node selection", t.selection_s),
            ("context load", t.context_load_s),
            ("injection layout", max(0.0, t.prepare_s - t.selection_s - t.context_load_s)),
            ("prefill", t.prefill_s),
            ("decode", t.decode_s),
        ],
    )
