"""Where compressed contexts live: their stored format (codec), the stores, and their cost.

store = open_store("memory://?max_bytes=1073741824")   # in-process LRU, the embedded default
store = open_store("redis://:password@host:6379/0")    # shared by replicas; rediss:// for TLS

encoded = encode(tree, fingerprints=..., base_n_layers=..., tenant=..., source_sha256=..., ttl_s=...)
store.put(context_id, encoded)
source = store.open(context_id, fingerprints, tenant=...)    # a ContextSource for the decoder
"""

from __future__ import annotations

import urllib.parse

from sharedllm.common.errors import InvalidInput
from sharedllm.common.store.accounting import StorageReport, full_kv_cache_bytes, storage_report
from sharedllm.common.store.base import ContextInfo, ContextStore, StoreCounters, StoredContext, StoreStats
from sharedllm.common.store.codec import EncodedContext, Fingerprints, decode, encode
from sharedllm.common.store.memory import MemoryStore
from sharedllm.common.store.names import DEFAULT_TENANT, content_context_id, new_context_id, validate_name
from sharedllm.common.store.quota import Quota, TenantQuotas, TenantUsage
from sharedllm.common.store.redis_store import DEFAULT_REPLICA_TIMEOUT_S, DEFAULT_TIMEOUT_S, RedisStore


def open_store(
    url: str = "memory://",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retries: int | None = None,
    min_replicas: int = 0,
    replica_timeout_s: float = DEFAULT_REPLICA_TIMEOUT_S,
) -> ContextStore:
    """A store from its URL: memory://[?max_bytes=N], redis://..., rediss://... (TLS),
    redis+cluster://... or rediss+cluster://... (a Redis Cluster, any one of its nodes).
    timeout_s and retries bound how long a network store may hold a call; min_replicas: the
    replicas a stored context must reach before it is acknowledged (RedisStore)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStore.from_url(url)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        return RedisStore(
            url, timeout_s=timeout_s, retries=retries, min_replicas=min_replicas, replica_timeout_s=replica_timeout_s
        )
    if min_replicas:
        raise InvalidInput("min_replicas needs a Redis store (redis://, rediss://, redis+cluster://...)")
    raise InvalidInput(
        f"store URL must start with memory://, redis://, rediss://, redis+cluster:// or rediss+cluster://, "
        f"got scheme {scheme!r}"
    )


__all__ = [
    "DEFAULT_TENANT",
    "ContextInfo",
    "ContextStore",
    "EncodedContext",
    "Fingerprints",
    "MemoryStore",
    "Quota",
    "RedisStore",
    "StorageReport",
    "StoreCounters",
    "StoreStats",
    "StoredContext",
    "TenantQuotas",
    "TenantUsage",
    "content_context_id",
    "decode",
    "encode",
    "full_kv_cache_bytes",
    "new_context_id",
    "open_store",
    "storage_report",
    "validate_name",
]
