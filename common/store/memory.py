"""In-process context store: the embedded default, bounded by bytes with LRU eviction.

It keeps the encoded bytes, not tensors, so it goes through the same verification as Redis and
its byte bound is the real stored size. An opened context reads from the version that was
current when it was opened, so a concurrent replace or delete never mixes two trees.

Contexts are lost when the process exits and the least recently used one is evicted when a
new one does not fit, pinned or not: use Redis for contexts that must survive.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sharedllm.common.errors import ContextChanged, InvalidInput, ResourceExhausted
from sharedllm.common.generated.sharedllm.v1 import context_pb2 as pb
from sharedllm.common.store import codec
from sharedllm.common.store.base import ContextKey, ContextStore, PartReader, StoreStats
from sharedllm.common.store.codec import EncodedContext
from sharedllm.common.store.quota import Quota, TenantUsage

DEFAULT_MAX_BYTES = 1 << 30


@dataclass
class _Entry:
    encoded: EncodedContext
    lifetime_s: float | None  # None: pinned or stored without expiry
    deadline: float | None  # clock() time of expiry

    def restart(self, now: float) -> None:
        self.deadline = None if self.lifetime_s is None else now + self.lifetime_s


@dataclass(frozen=True)
class _Snapshot:
    """The parts of the version a reader opened (immutable bytes, read without the lock)."""

    encoded: EncodedContext

    def use(self, manifest: pb.ContextManifest, *, read_retrieval_keys: bool) -> bytes | None:
        """Opening already counted the use; a snapshot stays readable after a replace or delete."""
        return self.encoded.retrieval_keys if read_retrieval_keys else None

    def read_nodes(self, manifest: pb.ContextManifest, indices: Sequence[int]) -> list[bytes]:
        return [self.encoded.nodes[i] for i in indices]


class MemoryStore(ContextStore):
    """Thread-safe; `clock` is injectable so expiry can be tested without sleeping."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if max_bytes < 1:
            raise InvalidInput(f"max_bytes must be >= 1, got {max_bytes}")
        self.url = f"memory://?max_bytes={max_bytes}"
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[ContextKey, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """`memory://` or `memory://?max_bytes=N`."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        unknown = set(query) - {"max_bytes"}
        if unknown:
            raise InvalidInput(f"unknown memory store options {sorted(unknown)} in {url!r}")
        try:
            max_bytes = int(query.get("max_bytes", [DEFAULT_MAX_BYTES])[-1])
        except ValueError as exc:
            raise InvalidInput(f"max_bytes must be an integer in {url!r}") from exc
        return cls(max_bytes)

    def ping(self, *, writes: bool = False) -> None:
        """Always answers, and always has room: it lives in this process and evicts to make room."""

    def close(self) -> None:
        """Nothing to release; the contexts stay until the object is dropped."""

    def stats(self) -> StoreStats:
        with self._lock:
            self._drop_expired()
            contexts, stored = len(self._entries), self._bytes
        return StoreStats(self.url, contexts, stored, self._max_bytes, self._counters.snapshot())

    def _put(self, key: ContextKey, encoded: EncodedContext, quota: Quota, replaces: bytes | None) -> None:
        size = encoded.nbytes
        if size > self._max_bytes:
            raise ResourceExhausted(f"context of {size} bytes exceeds the memory store's max_bytes {self._max_bytes}")
        lifetime_ms = codec.lifetime_ms(encoded.manifest)
        with self._lock:
            self._drop_expired()
            if replaces is not None:
                current = self._live(key).encoded
                if current.version != replaces:
                    raise ContextChanged(f"context {key.context_id!r} was replaced meanwhile")
                kept = current.nodes[: encoded.kept_nodes]  # shared, not copied: bytes never change
                encoded = EncodedContext(encoded.manifest_frame, encoded.retrieval_keys, kept + encoded.nodes)
            entry = _Entry(encoded, None if lifetime_ms is None else lifetime_ms / 1000, None)
            if quota.limited:
                quota.check(key.tenant, self._tenant_usage(key.tenant, excluding=key), size)
            self._remove(key)
            while self._bytes + size > self._max_bytes:
                self._remove(next(iter(self._entries)))
                self._counters.add(evictions=1)
            entry.restart(self._clock())
            self._entries[key] = entry
            self._bytes += size

    def _usage(self, tenant: str, excluding: str | None) -> TenantUsage:
        with self._lock:
            self._drop_expired()
            return self._tenant_usage(tenant, None if excluding is None else ContextKey(tenant, excluding))

    def _tenant_usage(self, tenant: str, excluding: ContextKey | None = None) -> TenantUsage:
        """Live contexts of `tenant` (lock held, expired entries dropped): a walk over the entries,
        which an in-process store holds few enough of."""
        sizes = [e.encoded.nbytes for k, e in self._entries.items() if k.tenant == tenant and k != excluding]
        return TenantUsage(len(sizes), sum(sizes))

    def _open(self, key: ContextKey) -> tuple[bytes, PartReader]:
        with self._lock:
            entry = self._used(key)
        return entry.encoded.manifest_frame, _Snapshot(entry.encoded)

    def _info(self, key: ContextKey) -> tuple[bytes, float | None]:
        with self._lock:
            entry = self._live(key)
            left = None if entry.deadline is None else entry.deadline - self._clock()
        return entry.encoded.manifest_frame, left

    def _touch(self, key: ContextKey, pin: bool) -> None:
        with self._lock:
            entry = self._used(key)
            if pin:
                entry.lifetime_s = entry.deadline = None

    def _delete(self, key: ContextKey) -> bool:
        with self._lock:
            return self._remove(key)

    def _live(self, key: ContextKey) -> _Entry:
        """The unexpired entry (caller holds the lock)."""
        entry = self._entries.get(key)
        if entry is None or (entry.deadline is not None and entry.deadline <= self._clock()):
            self._remove(key)
            raise key.not_found()
        return entry

    def _used(self, key: ContextKey) -> _Entry:
        """The live entry, marked most recently used with its expiry restarted (lock held)."""
        entry = self._live(key)
        self._entries.move_to_end(key)
        entry.restart(self._clock())
        return entry

    def _remove(self, key: ContextKey) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry.encoded.nbytes
        return True

    def _drop_expired(self) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.deadline is not None and e.deadline <= now]:
            self._remove(key)
