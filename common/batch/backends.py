"""Where a batch worker's model work runs: in the worker itself, or on the gRPC services.

Both answer the same two calls, so the tasks do not know which they have:
`ensure_context(text)` stores the document's context under an id derived from its content and
from what compressed it (model, adapter, tree), reusing one already stored; and
`generate(context_id, prompt, ...)` answers with greedy decoding unless asked otherwise. The
same document, question and seed give the same text either way (the services run the same
runtime; the suite checks both paths against each other).

Failures come in two kinds: `Transient` (the store or a service is unavailable or full; the task
retries with backoff) and everything else, which fails this document alone.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from typing import Protocol

import grpc

from sharedllm.common.engine.params import SAMPLING_FIELDS, SamplingParams
from sharedllm.common.errors import ContextNotFound, ResourceExhausted, SharedLLMError, StoreUnavailable
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2, compressor_pb2_grpc, decoder_pb2, decoder_pb2_grpc
from sharedllm.common.rpc.client import call_metadata, grounding_field, open_channel, upload
from sharedllm.common.rpc.tls import ClientTls
from sharedllm.common.store import content_context_id

TRANSIENT_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
)
ID_TENANT = "batch"  # salt of content-derived ids; the services keep each tenant's contexts apart anyway


class Transient(SharedLLMError):
    """Worth retrying: a service or the store is unavailable, busy or full right now."""


class DocumentFailed(SharedLLMError):
    """This document cannot be processed (empty, too long, not text...): fail it, not the job."""


@dataclass(frozen=True)
class StoredDocument:
    context_id: str
    reused: bool  # True: the context was already stored, nothing was compressed
    tokens: int
    seconds: float


class Backend(Protocol):
    def ensure_context(self, text: str) -> StoredDocument: ...

    def generate(
        self, context_id: str, prompt: str, params: SamplingParams, evidence_tokens: int | None = None
    ) -> str: ...

    def close(self) -> None: ...


def content_id(fingerprint: str, document: bytes) -> str:
    """The context id of a document as one compressor setup stores it: equal inputs, equal ids."""
    return content_context_id(ID_TENANT, fingerprint.encode() + b"\0" + hashlib.sha256(document).digest())


class EmbeddedBackend:
    """The runtime in this process (model loaded once per worker), over a shared store."""

    def __init__(self, runtime) -> None:  # a ContextRuntime; untyped to keep torch out of imports here
        self.runtime = runtime
        f = runtime.fingerprints
        self.fingerprint = f"{f.model}:{f.adapter}"

    def ensure_context(self, text: str) -> StoredDocument:
        started = time.perf_counter()
        context_id = content_id(self.fingerprint, text.encode("utf-8"))
        try:
            try:  # stored already: nothing to tokenise or compress
                info = self.runtime.store.info(context_id)
                self.runtime.store.touch(context_id)
                return StoredDocument(context_id, True, info.manifest.n_tokens, time.perf_counter() - started)
            except ContextNotFound:
                pass
            outcome = self.runtime.compress_text(text, context_id=context_id)
        except (StoreUnavailable, ResourceExhausted) as exc:
            raise Transient(str(exc)) from exc
        except SharedLLMError as exc:
            raise DocumentFailed(str(exc)) from exc
        return StoredDocument(context_id, False, outcome.n_tokens, time.perf_counter() - started)

    def generate(self, context_id: str, prompt: str, params: SamplingParams, evidence_tokens: int | None = None) -> str:
        from sharedllm.common.engine.generation import run_to_end

        try:
            return run_to_end(self.runtime.generate(context_id, prompt, params, evidence_tokens=evidence_tokens)).text
        except (StoreUnavailable, ResourceExhausted) as exc:
            raise Transient(str(exc)) from exc
        except SharedLLMError as exc:
            raise DocumentFailed(str(exc)) from exc

    def close(self) -> None:
        self.runtime.store.close()


class RemoteBackend:
    """The compressor and decoder services; this worker only sends requests."""

    def __init__(
        self,
        compressor: str,
        decoder: str,
        api_key: str | None,
        timeout_s: float = 600.0,
        tls: ClientTls | None = None,
    ) -> None:
        """tls: how to secure both channels (None: plaintext, the services' default)."""
        self.metadata = call_metadata(api_key)
        self.timeout_s = timeout_s
        self.channels = (open_channel(compressor, tls), open_channel(decoder, tls))
        self.compressor = compressor_pb2_grpc.CompressorServiceStub(self.channels[0])
        self.decoder = decoder_pb2_grpc.DecoderServiceStub(self.channels[1])
        self._fingerprint: str | None = None

    def _call(self, method, request):
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise _classified(exc) from None

    def fingerprint(self) -> str:
        """The services' model, adapter and tree: part of every content-derived id."""
        if self._fingerprint is None:
            info = self._call(self.decoder.GetServerInfo, decoder_pb2.GetServerInfoRequest())
            tree = info.tree_config.SerializeToString(deterministic=True).hex()
            self._fingerprint = f"{info.model_fingerprint}:{info.adapter_fingerprint}:{tree}"
        return self._fingerprint

    def ensure_context(self, text: str) -> StoredDocument:
        started = time.perf_counter()
        data = text.encode("utf-8")
        context_id = content_id(self.fingerprint(), data)
        try:
            info = self.compressor.GetContext(
                compressor_pb2.GetContextRequest(context_id=context_id), metadata=self.metadata, timeout=self.timeout_s
            )
            if info.compatible:
                return StoredDocument(context_id, True, info.document_tokens, time.perf_counter() - started)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise _classified(exc) from None
        options = compressor_pb2.CompressOptions(context_id=context_id)
        try:
            response = self.compressor.CompressStream(
                upload(options, io.BytesIO(data)), metadata=self.metadata, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise _classified(exc) from None
        context = response.context
        return StoredDocument(context_id, False, context.document_tokens, time.perf_counter() - started)

    def generate(self, context_id: str, prompt: str, params: SamplingParams, evidence_tokens: int | None = None) -> str:
        fields = {name: getattr(params, name) for name in SAMPLING_FIELDS if getattr(params, name) is not None}
        request = decoder_pb2.GenerateRequest(
            context_id=context_id, prompt=prompt, stop=params.stop, grounding=grounding_field(params), **fields
        )
        if evidence_tokens is not None:
            request.evidence_tokens = evidence_tokens
        try:
            stream = self.decoder.Generate(request, metadata=self.metadata, timeout=self.timeout_s)
            return "".join(response.text for response in stream)
        except grpc.RpcError as exc:
            raise _classified(exc) from None

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def _classified(exc: grpc.RpcError) -> SharedLLMError:
    message = f"{exc.code().name}: {exc.details()}"
    return Transient(message) if exc.code() in TRANSIENT_CODES else DocumentFailed(message)
