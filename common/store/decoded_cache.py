"""Verified, decoded payloads kept in the reading process, addressed by their SHA-256.

Why: a repeat question about the same document reads mostly the same nodes again. Fetching,
hashing and deserialising them each time is what made the Redis path slower than the in-process
one and is pure overhead in both, so the decoder keeps what it already verified.

Why content addressing: a manifest lists the SHA-256 of every payload, and a manifest is itself
verified before use, so a digest names exactly one byte string. A cache keyed by digest therefore
needs no invalidation (a replaced or deleted context has new digests or no manifest at all, and
reads still start from the store's manifest), serves every store alike, and cannot leak between
tenants: a reader only asks for digests its own verified manifest lists.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from common.errors import InvalidInput

DEFAULT_CACHE_BYTES = 512 << 20

Tensors = tuple[torch.Tensor, ...]


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

    def get(self, digest: bytes) -> Tensors | None:
        with self._lock:
            value = self._entries.get(digest)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(digest)
            self._hits += 1
            return value

    def put(self, digest: bytes, tensors: Tensors) -> None:
        """Keep `tensors` (already verified against `digest`); the least recently used make room."""
        size = _nbytes(tensors)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            while self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _nbytes(evicted)
            self._entries[digest] = tensors
            self._bytes += size

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._bytes, self.max_bytes, self._hits, self._misses)


def _nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
