"""The one small interface every context store implements, and the reading logic they share.

Why one interface: the decoder reads a context through `ContextSource` whether it lives in this
process (embedded mode) or in a Redis shared by every replica. A store only moves bytes; this
module verifies them (codec), so every store gives the same guarantees: a context is read whole
or not at all, a corrupted part raises DataCorruption, never a wrong tensor.

Context ids are namespaced per tenant inside every store, so another tenant's id is simply
ContextNotFound, which reveals nothing about whether it exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

import torch

from sharedllm.common.config import TreeConfig
from sharedllm.common.engine.tree import SelectedNodes
from sharedllm.common.errors import ContextNotFound, DataCorruption, InvalidInput
from sharedllm.common.generated.sharedllm.v1 import context_pb2 as pb
from sharedllm.common.store import codec
from sharedllm.common.store.codec import EncodedContext, Fingerprints
from sharedllm.common.store.decoded_cache import DecodedCache
from sharedllm.common.store.names import DEFAULT_TENANT, validate_name
from sharedllm.common.store.quota import Quota, TenantUsage

T = TypeVar("T")


@dataclass(frozen=True)
class ContextKey:
    """Where a context lives: its tenant and its id, both validated."""

    tenant: str
    context_id: str

    @classmethod
    def of(cls, tenant: str, context_id: str) -> ContextKey:
        return cls(validate_name(tenant, "tenant"), validate_name(context_id, "context id"))

    def not_found(self, detail: str = "never stored, expired or deleted") -> ContextNotFound:
        return ContextNotFound(f"context {self.context_id!r} not found ({detail})")


@dataclass(frozen=True)
class ContextInfo:
    """What a store knows about one context without reading its payloads."""

    context_id: str
    manifest: pb.ContextManifest
    stored_bytes: int  # every stored byte, manifest included
    expires_in_s: float | None  # None: no expiry (pinned or stored without one)


@dataclass
class StoreCounters:
    """Totals since this store object was created, in this process."""

    bytes_written: int = 0
    bytes_read: int = 0
    integrity_failures: int = 0
    evictions: int = 0  # contexts dropped to stay within a capacity (the memory store's LRU)


@dataclass(frozen=True)
class StoreStats:
    url: str  # without password
    contexts: int | None  # None where counting would need a scan of the whole store (Redis)
    stored_bytes: int | None
    capacity_bytes: int | None
    counters: StoreCounters


class _Counters:
    """Thread-safe StoreCounters shared by a store and the contexts it opened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = StoreCounters()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._values, name, getattr(self._values, name) + delta)

    def snapshot(self) -> StoreCounters:
        with self._lock:
            return dataclasses.replace(self._values)

    @contextlib.contextmanager
    def integrity(self) -> Iterator[None]:
        """Count every DataCorruption that passes through (the integrity-failure metric)."""
        try:
            yield
        except DataCorruption:
            self.add(integrity_failures=1)
            raise


class PartReader(Protocol):
    """One stored version of a context, as its store reads it after the manifest."""

    def use(self, manifest: pb.ContextManifest, *, read_retrieval_keys: bool) -> bytes | None:
        """Count a use (restart the expiry) and, if asked, return the retrieval-keys payload.

        Raises ContextNotFound if the version opened was deleted or expired meanwhile; a version
        replaced meanwhile stays readable (for a grace period in Redis), like a snapshot.
        """
        ...

    def read_nodes(self, manifest: pb.ContextManifest, indices: Sequence[int]) -> list[bytes]:
        """The payloads of nodes `indices` (chunk * N + node), in one round trip."""
        ...


class StoredContext:
    """A context opened from a store: a ContextSource that reads only the nodes it is asked for.

    Opening read the manifest and the retrieval keys; `fetch` reads the selected nodes and
    verifies each one, taking those already verified from the decoded cache when there is one.
    `bytes_read` counts every byte this object read from the store, for per-request reports.
    Like a snapshot, nodes the cache holds are served even if the context is deleted after it
    was opened; the open itself checked that it was live.
    """

    def __init__(
        self,
        context_id: str,
        manifest: pb.ContextManifest,
        retrieval_keys: torch.Tensor,
        token_ids: torch.Tensor,
        reader: PartReader,
        counters: _Counters,
        bytes_read: int,
        cache: DecodedCache | None = None,
        version: bytes = b"",
    ) -> None:
        self.context_id = context_id
        self.manifest = manifest
        self._config = codec.tree_config(manifest)
        self._retrieval_keys = retrieval_keys
        self._token_ids = token_ids
        self._counts = codec.node_counts(manifest)
        self._reader = reader
        self._counters = counters
        self._cache = cache
        self.bytes_read = bytes_read
        self.cached_nodes = 0  # nodes the last fetches took from the decoded cache
        self.version = version  # the version opened (its manifest frame's digest): what an append replaces

    @property
    def config(self) -> TreeConfig:
        return self._config

    @property
    def chunk_lengths(self) -> tuple[int, ...]:
        return tuple(self.manifest.chunk_lengths)

    @property
    def retrieval_keys(self) -> torch.Tensor:
        return self._retrieval_keys

    @property
    def token_ids(self) -> torch.Tensor:
        return self._token_ids

    @property
    def index_digest(self) -> bytes:
        """SHA-256 of the verified index part (retrieval keys and token ids): names the document's passages."""
        return self.manifest.retrieval_keys_sha256

    def fetch(self, selection: torch.Tensor) -> SelectedNodes:
        """Read nodes `selection[b, k]` of every chunk b, laid out as ContextTree.fetch does."""
        n_chunks, n_nodes = self.manifest.n_chunks, self.manifest.nodes_per_chunk
        if (
            selection.dim() != 2
            or selection.shape[0] != n_chunks
            or selection.shape[1] < 1
            or selection.is_floating_point()
            or selection.is_complex()
        ):
            raise InvalidInput(
                f"selection must be an integer tensor [{n_chunks}, K>=1], got {selection.dtype} "
                f"{tuple(selection.shape)}"
            )
        selection = selection.to("cpu", torch.long)
        if int(selection.min()) < 0 or int(selection.max()) >= n_nodes:
            raise InvalidInput(f"selected node indices must lie in [0, {n_nodes})")
        rows = (torch.arange(n_chunks).unsqueeze(1) * n_nodes + selection).flatten()
        order = rows.tolist()
        nodes = self._nodes(list(dict.fromkeys(order)))  # each node read once, even if selected twice
        return SelectedNodes(
            keys=torch.stack([nodes[i][0] for i in order], dim=1),
            values=torch.stack([nodes[i][1] for i in order], dim=1),
            counts=self._counts[rows],
            chunk_of_row=rows // n_nodes,
        )

    def _nodes(self, wanted: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Verified keys and values of nodes `wanted`: cached ones, then the rest in one store read."""
        manifest, digests, cache = self.manifest, self.manifest.node_sha256, self._cache
        nodes, missing = {}, []
        for i in wanted:
            node = _from_cache(cache, manifest.tenant, digests[i], lambda t, i=i: codec.check_node(manifest, i, t))
            if node is None:
                missing.append(i)
            else:
                nodes[i] = node
        with self._counters.integrity():
            payloads = self._reader.read_nodes(manifest, missing) if missing else []
            for i, payload in zip(missing, payloads, strict=True):
                keys, values = codec.decode_node(manifest, i, payload)
                nodes[i] = (keys, values)
                if cache is not None:
                    cache.put(manifest.tenant, digests[i], {"keys": keys, "values": values})
        read = sum(map(len, payloads))
        self.bytes_read += read
        self.cached_nodes += len(wanted) - len(missing)
        self._counters.add(bytes_read=read)
        return nodes


def _from_cache(cache: DecodedCache | None, tenant: str, digest: bytes, check: Callable[[dict], T]) -> T | None:
    """A cache entry that passes the codec's `check` against this manifest, or None: no cache, no
    entry, or an entry that does not fit (dropped, so the caller reads the payload from the store)."""
    entry = cache.get(tenant, digest) if cache is not None else None
    if entry is None:
        return None
    try:
        return check(entry)
    except DataCorruption:
        cache.discard(tenant, digest)
        return None


class ContextStore(ABC):
    """Put, open, expire, pin and delete compressed contexts.

    A context's lifetime comes from its manifest (`codec.encode(ttl_s=...)`): it expires that
    long after its last use, and every `open` is a use. `touch(pin=True)` removes the expiry.
    """

    url: str  # for messages and metrics; never contains a password

    def __init__(self) -> None:
        self._counters = _Counters()

    def put(
        self, context_id: str, encoded: EncodedContext, quota: Quota | None = None, *, replaces: bytes | None = None
    ) -> None:
        """Store (or atomically replace) a context under the tenant named in its manifest.

        quota: the tenant's limits, checked with the write (QuotaExceeded when it would pass one;
        the context it replaces does not count). Every store keeps per-tenant usage either way.
        replaces: the version (StoredContext.version) this write must replace; if the context is
        another version by then, nothing is written and ContextChanged is raised (ContextNotFound
        if it is gone). Required for an appended version (encoded.kept_nodes > 0), whose kept
        nodes are that version's.
        """
        if encoded.kept_nodes and replaces is None:
            raise ValueError("an appended version names the version it extends (replaces=...)")
        key = ContextKey.of(encoded.manifest.tenant, context_id)
        self._put(key, encoded, quota or Quota(), replaces)
        self._counters.add(bytes_written=encoded.written_bytes)

    def usage(self, tenant: str, *, excluding: str | None = None) -> TenantUsage:
        """The tenant's live contexts and stored bytes (expired ones no longer count; writes in
        progress do), leaving out context `excluding` (one about to be replaced)."""
        return self._usage(validate_name(tenant, "tenant"), excluding)

    def open(
        self,
        context_id: str,
        expected: Fingerprints,
        *,
        tenant: str = DEFAULT_TENANT,
        cache: DecodedCache | None = None,
    ) -> StoredContext:
        """Read and verify the manifest and retrieval keys; nodes are read later by `fetch`.

        cache: verified payloads already decoded by this process (by digest); what it holds is
        not read again, and what is read is added to it.
        Raises ContextNotFound, IncompatibleContext (other model, adapter or format version),
        DataCorruption, StoreUnavailable.
        """
        key = ContextKey.of(tenant, context_id)
        with self._counters.integrity():
            frame, reader = self._open(key)
            manifest = self._verified_manifest(key, frame, expected)
            digest = manifest.retrieval_keys_sha256
            index = _from_cache(cache, tenant, digest, lambda t: codec.check_retrieval_keys(manifest, t))
            payload = reader.use(manifest, read_retrieval_keys=index is None)
            if index is None:
                index = codec.decode_retrieval_keys(manifest, payload)
                if cache is not None:
                    cache.put(tenant, digest, {"retrieval_keys": index[0], "token_ids": index[1]})
        read = len(frame) + len(payload or b"")
        self._counters.add(bytes_read=read)
        return StoredContext(
            context_id, manifest, *index, reader, self._counters, read, cache, version=frame[: codec.DIGEST_BYTES]
        )

    def info(self, context_id: str, *, tenant: str = DEFAULT_TENANT) -> ContextInfo:
        """The verified manifest, stored size and current expiry; not a use (no refresh)."""
        key = ContextKey.of(tenant, context_id)
        with self._counters.integrity():
            frame, expires_in_s = self._info(key)
            manifest = self._verified_manifest(key, frame, None)
        return ContextInfo(context_id, manifest, manifest.stored_bytes + len(frame), expires_in_s)

    def touch(self, context_id: str, *, tenant: str = DEFAULT_TENANT, pin: bool = False) -> None:
        """Restart the expiry of every part (no-op when pinned), or with `pin` remove it for good."""
        with self._counters.integrity():
            self._touch(ContextKey.of(tenant, context_id), pin)

    def delete(self, context_id: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        """Remove every part; False if there was no such context."""
        return self._delete(ContextKey.of(tenant, context_id))

    @abstractmethod
    def stats(self) -> StoreStats: ...

    @abstractmethod
    def ping(self, *, writes: bool = False) -> None:
        """Raise StoreUnavailable if the store cannot answer reads now, or with `writes` if it could
        not take a context now either (ResourceExhausted: no room) (health checks)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _verified_manifest(key: ContextKey, frame: bytes, expected: Fingerprints | None) -> pb.ContextManifest:
        manifest = codec.decode_manifest(frame, expected)
        if manifest.tenant != key.tenant:
            raise DataCorruption(
                f"context {key.context_id!r} is stored under tenant {key.tenant!r} "
                f"but its manifest names tenant {manifest.tenant!r}"
            )
        return manifest

    @abstractmethod
    def _put(self, key: ContextKey, encoded: EncodedContext, quota: Quota, replaces: bytes | None) -> None: ...

    @abstractmethod
    def _usage(self, tenant: str, excluding: str | None) -> TenantUsage: ...

    @abstractmethod
    def _open(self, key: ContextKey) -> tuple[bytes, PartReader]:
        """The framed manifest of the current version and a reader for its parts."""

    @abstractmethod
    def _info(self, key: ContextKey) -> tuple[bytes, float | None]:
        """The framed manifest and the seconds left before expiry (None: no expiry)."""

    @abstractmethod
    def _touch(self, key: ContextKey, pin: bool) -> None: ...

    @abstractmethod
    def _delete(self, key: ContextKey) -> bool: ...
