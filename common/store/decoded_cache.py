"""Verified, decoded payloads kept in the reading process, addressed by their SHA-256.

Why: a repeat question about the same document reads mostly the same nodes again. Fetching,
hashing and deserialising them each time is what made the Redis path slower than the in-process
one and is pure overhead in both, so the decoder keeps what it already verified.

Why content addressing: a manifest lists the SHA-256 of every payload, and a manifest is itself
verified before use, so a digest names exactly one byte string. A cache keyed by digest therefore
needs no invalidation (a replaced or deleted context has new digests or no manifest at all, and
reads still start from the store's manifest) and serves every store alike. Keys are (tenant,
digest), never the digest alone: two tenants with the same document have the same digests, and
a hit on another tenant's entry would tell one that the other recently read that text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from sharedllm.common.errors import InvalidInput

DEFAULT_CACHE_BYTES = 512 << 20

Tensors = dict[str, torch.Tensor]  # named as in the payload, so the codec checks them as it checks payloads


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    capacity_bytes: int
    hits: int
    misses: int


class DecodedCache:
    """A thread-safe LRU of decoded tensors, bounded by their bytes.

    Values are shared with every reader: callers must treat them as read-only (the decoder only
    stacks and indexes them, which copies).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 1:
            raise InvalidInput(f"decoded cache size must be >= 1 byte, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, Tensors] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._hits = 0
        self._misses = 0

    def get(self, tenant: str, digest: bytes) -> Tensors | None:
        key = _key(tenant, digest)
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, tenant: str, digest: bytes, tensors: Tensors) -> None:
        """Keep `tensors` (already verified against `digest`); the least recently used make room."""
        key, size = _key(tenant, digest), _nbytes(tensors)
        if size > self.max_bytes:
            return
        with self._lock:
            self._pop(key)
            while self._bytes + size > self.max_bytes:
                self._pop(next(iter(self._entries)))
            self._entries[key] = tensors
            self._bytes += size

    def discard(self, tenant: str, digest: bytes) -> None:
        """Forget an entry (one that no longer fits what a manifest declares)."""
        with self._lock:
            self._pop(_key(tenant, digest))

    def _pop(self, key: bytes) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self._bytes -= _nbytes(value)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self.max_bytes, self._hits, self._misses)


def _key(tenant: str, digest: bytes) -> bytes:
    return tenant.encode() + b"\0" + digest  # tenant names never contain NUL (validate_name)


def _nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
