"""What the Redis store promises when replicas and TLS are in play, against real redis-servers.

- With `min_replicas`, a stored context has reached that many replicas when `put` returns: read
  from a replica at once, it is whole. Without enough replicas, `put` fails as StoreUnavailable
  (gRPC UNAVAILABLE) within the timeout and leaves no key of that context behind.
- TLS with client certificates (`rediss://...?ssl_certfile=...&ssl_keyfile=...`) against a
  redis-server that requires them: served with a certificate, refused without one.
"""

from __future__ import annotations

import shutil
import time

import pytest
from redis_server import TlsFiles
from test_codec import encode_tree
from test_store_memory import ALL_NODES, assert_same_nodes, fetch_tree

from sharedllm.common.errors import InvalidInput, StoreUnavailable
from sharedllm.common.store import RedisStore, open_store


def keys_of(client, tenant: str) -> list[bytes]:
    return list(client.scan_iter(match=f"sllm:{{{tenant}:*", count=1000))


def attach(replica) -> None:
    """Until the replica has synchronised with its primary and follows its stream."""
    deadline = time.monotonic() + 10
    while replica.client().info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not attach"
        time.sleep(0.05)


def snapshot(client, tenant: str) -> dict[bytes, object]:
    """Every key of the tenant with its value (a hash as a dict)."""
    return {
        key: client.hgetall(key) if client.type(key) == b"hash" else client.get(key) for key in keys_of(client, tenant)
    }


def test_a_put_waits_for_its_replicas_and_reads_whole_from_one(make_redis_server, tenant, make_tree):
    primary = make_redis_server()
    replica = make_redis_server(replica_of=primary)
    attach(replica)
    tree = make_tree()
    with RedisStore(primary.url, min_replicas=1, replica_timeout_s=5) as store:
        for i in range(5):
            store.put(f"doc-{i}", encode_tree(tree, tenant=tenant))
            # The moment put returns, WAIT has made sure the replica holds every key of it.
            on_replica = snapshot(replica.client(), tenant)
            assert on_replica == snapshot(primary.client(), tenant) and len(on_replica) == (i + 1) * 20
        _, nodes = fetch_tree(store, "doc-4", tenant)
    assert_same_nodes(nodes, tree.fetch(ALL_NODES))


def test_a_put_without_enough_replicas_fails_and_leaves_nothing(make_redis_server, tenant, make_tree):
    primary = make_redis_server()
    replica = make_redis_server(replica_of=primary)
    attach(replica)
    started = time.monotonic()
    store = RedisStore(primary.url, min_replicas=2, replica_timeout_s=0.5)
    with store, pytest.raises(StoreUnavailable, match="1 of 2 replicas"):
        store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
    assert time.monotonic() - started < 5
    assert keys_of(primary.client(), tenant) == []  # nothing half-written on the primary
    replica.stop()
    store = RedisStore(primary.url, min_replicas=1, replica_timeout_s=0.5)
    with store, pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
        store.put("doc-2", encode_tree(make_tree(), tenant=tenant))
    assert keys_of(primary.client(), tenant) == []


def test_replica_settings_are_checked():
    for bad in ({"min_replicas": -1}, {"min_replicas": 1, "replica_timeout_s": 0}):
        with pytest.raises(InvalidInput):
            RedisStore("redis://127.0.0.1:1/0", **bad)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_a_client_certificate(make_redis_server, tmp_path, tenant, make_tree):
    server = make_redis_server(tls=TlsFiles.create(tmp_path), client_certificates=True)
    tree = make_tree()
    assert "ssl_certfile=" in server.url
    with open_store(server.url) as store:
        store.put("doc-1", encode_tree(tree, tenant=tenant))
        _, nodes = fetch_tree(store, "doc-1", tenant)
    assert_same_nodes(nodes, tree.fetch(ALL_NODES))
    without_certificate = server.url.split("&ssl_certfile=")[0]
    with open_store(without_certificate, timeout_s=2, retries=0) as store, pytest.raises(StoreUnavailable):
        store.ping()
