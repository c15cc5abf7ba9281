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
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.errors import ContextNotFound, ResourceExhausted, SharedLLMError, StoreUnavailable
from sharedllm.common.rpc.client import CompressorClient, DecoderClient, RemoteError
from sharedllm.common.rpc.tls import ClientTls
from sharedllm.common.store import content_context_id

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


class Backend(ABC):
    """Where the model runs, as the tasks see it: one document's context, and whole answers."""

    @abstractmethod
    def ensure_context(self, text: str) -> StoredDocument: ...

    @abstractmethod
    def answer(self, context_id: str | Sequence[str], prompt: str, params: SamplingParams, **evidence) -> Iterator[Any]:
        """The runtime's events for generate(context_id, prompt, params, **evidence) (a list of
        ids: one question across those contexts)."""

    @abstractmethod
    def failures(self) -> AbstractContextManager[None]:
        """Turns this backend's errors into Transient or DocumentFailed."""

    def generate(
        self,
        context_id: str,
        prompt: str,
        params: SamplingParams,
        evidence_tokens: int | None = None,
        evidence_mode: str | None = None,
    ) -> str:
        """The whole answer, as the runtime's generate gives it for the same arguments."""
        evidence = {"evidence_tokens": evidence_tokens, "evidence_mode": evidence_mode}
        with self.failures():
            return run_to_end(self.answer(context_id, prompt, params, **evidence)).text

    @abstractmethod
    def close(self) -> None: ...


def content_id(fingerprint: str, document: bytes) -> str:
    """The context id of a document as one compressor setup stores it: equal inputs, equal ids."""
    return content_context_id(ID_TENANT, fingerprint.encode() + b"\0" + hashlib.sha256(document).digest())


class EmbeddedBackend(Backend):
    """The runtime in this process (model loaded once per worker), over a shared store."""

    def __init__(self, runtime) -> None:  # a ContextRuntime; untyped to keep torch out of imports here
        self.runtime = runtime
        f = runtime.fingerprints
        self.fingerprint = f"{f.model}:{f.adapter}"

    def ensure_context(self, text: str) -> StoredDocument:
        started = time.perf_counter()
        context_id = content_id(self.fingerprint, text.encode("utf-8"))
        with self.failures():
            try:  # stored already: nothing to tokenise or compress
                info = self.runtime.store.info(context_id)
                self.runtime.store.touch(context_id)
                return StoredDocument(context_id, True, info.manifest.n_tokens, time.perf_counter() - started)
            except ContextNotFound:
                pass
            outcome = self.runtime.compress_text(text, context_id=context_id)
        return StoredDocument(context_id, False, outcome.n_tokens, time.perf_counter() - started)

    def answer(self, context_id: str | Sequence[str], prompt: str, params: SamplingParams, **evidence) -> Iterator[Any]:
        return self.runtime.generate(context_id, prompt, params, **evidence)

    @contextmanager
    def failures(self) -> Iterator[None]:
        try:
            yield
        except (Transient, DocumentFailed):
            raise  # already classified (by a call inside this one)
        except (StoreUnavailable, ResourceExhausted) as exc:
            raise Transient(str(exc)) from exc
        except SharedLLMError as exc:
            raise DocumentFailed(str(exc)) from exc

    def close(self) -> None:
        self.runtime.store.close()


class RemoteBackend(Backend):
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
        options = {"api_key": api_key, "tls": tls, "timeout_s": timeout_s}
        self.compressor = CompressorClient(compressor, **options)
        self.decoder = DecoderClient(decoder, **options)
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """The services' model, adapter and tree: part of every content-derived id."""
        if self._fingerprint is None:
            with classified():
                info = self.decoder.server_info()
            tree = info.tree_config.SerializeToString(deterministic=True).hex()
            self._fingerprint = f"{info.model_fingerprint}:{info.adapter_fingerprint}:{tree}"
        return self._fingerprint

    def ensure_context(self, text: str) -> StoredDocument:
        started = time.perf_counter()
        data = text.encode("utf-8")
        context_id = content_id(self.fingerprint(), data)
        with classified():
            try:
                stored = self.compressor.context(context_id)
                if stored.compatible:
                    return StoredDocument(context_id, True, stored.n_tokens, time.perf_counter() - started)
            except RemoteError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
            outcome = self.compressor.compress(data, context_id=context_id)
        return StoredDocument(context_id, False, outcome.n_tokens, time.perf_counter() - started)

    def answer(self, context_id: str | Sequence[str], prompt: str, params: SamplingParams, **evidence) -> Iterator[Any]:
        return self.decoder.generate(context_id, prompt, params, **evidence)

    def failures(self) -> AbstractContextManager[None]:
        return classified()

    def close(self) -> None:
        self.compressor.close()
        self.decoder.close()


@contextmanager
def classified() -> Iterator[None]:
    """A failed call as the tasks act on it: retry it later (Transient) or fail this document."""
    try:
        yield
    except (Transient, DocumentFailed):
        raise  # already classified (by a call inside this one)
    except RemoteError as exc:
        raise (Transient(str(exc)) if exc.transient else DocumentFailed(str(exc))) from None
    except SharedLLMError as exc:  # refused here, before any call (the document, the settings)
        raise DocumentFailed(str(exc)) from exc
