"""The decoded cache's byte bound, LRU order and counters (its use by stores is in the store contract)."""

from __future__ import annotations

import pytest
import torch

from sharedllm.common.errors import InvalidInput
from sharedllm.common.store.decoded_cache import DecodedCache


def entry(n_floats: int) -> dict[str, torch.Tensor]:
    return {"keys": torch.zeros(n_floats), "values": torch.ones(n_floats)}  # 8 bytes per float pair


def test_least_recently_used_entries_make_room_within_the_byte_bound():
    cache = DecodedCache(max_bytes=3 * 8 * 10)
    for key in (b"a", b"b", b"c"):
        cache.put("t", key, entry(10))
    assert cache.get("t", b"a") is not None  # now b is the least recently used
    cache.put("t", b"d", entry(10))
    assert cache.get("t", b"b") is None
    assert all(cache.get("t", k) is not None for k in (b"a", b"c", b"d"))
    stats = cache.stats()
    assert stats.entries == 3 and stats.bytes == 240 == stats.capacity_bytes
    assert (stats.hits, stats.misses) == (4, 1)


def test_an_entry_larger_than_the_cache_is_not_kept_and_a_replaced_one_is_counted_once():
    cache = DecodedCache(max_bytes=100)
    cache.put("t", b"big", entry(20))
    assert cache.get("t", b"big") is None and cache.stats().bytes == 0
    cache.put("t", b"a", entry(5))
    cache.put("t", b"a", entry(5))
    assert cache.stats().bytes == 40 and cache.stats().entries == 1
    cache.discard("t", b"a")
    assert cache.stats().bytes == 0 and cache.get("t", b"a") is None


def test_entries_are_per_tenant():
    """The same document has the same digests for every tenant; a hit must not cross tenants."""
    cache = DecodedCache()
    cache.put("alice", b"digest", entry(4))
    assert cache.get("bob", b"digest") is None
    assert cache.get("alice", b"digest") is not None


def test_size_must_be_positive():
    with pytest.raises(InvalidInput):
        DecodedCache(max_bytes=0)
