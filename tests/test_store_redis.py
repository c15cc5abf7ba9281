"""The Redis store against a real redis-server: the store contract, the key layout and its
expiry, atomic publishing under concurrent writers, corruption fuzzing, persistence across a
crash, and outages."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Callable

import pytest
import redis
import torch
from redis.crc import key_slot
from redis_server import TlsFiles
from test_codec import FP, damage, encode_tree
from test_store_memory import ALL_NODES, StoreContract, assert_same_nodes, fetch_tree, same_nodes

from sharedllm.common.errors import ContextNotFound, DataCorruption, InvalidInput, ResourceExhausted, StoreUnavailable
from sharedllm.common.store import RedisStore, codec, open_store
from sharedllm.common.store.base import ContextKey
from sharedllm.common.store.decoded_cache import DecodedCache
from sharedllm.common.store.redis_store import GRACE_MS, PART_MARGIN_MS, STAGING_TTL_MS, redact


@pytest.fixture
def store(redis_server):
    with RedisStore(redis_server.url) as store:
        yield store


@pytest.fixture
def client(redis_server):
    with redis_server.client() as client:
        yield client


def context_keys(client, tenant: str) -> dict[str, int]:
    """Every key of a tenant, with its remaining time to live in ms (-1: none)."""
    names = [k.decode() for k in client.scan_iter(match=f"sllm:{{{tenant}:*", count=1000)]
    return {name: client.pttl(name) for name in names}


class TestRedisStoreContract(StoreContract):
    @pytest.fixture
    def elapse(self):
        return time.sleep


def test_one_hash_tag_per_context_and_a_ttl_on_every_key(store, client, tenant, make_tree):
    store.put("doc-1", encode_tree(make_tree(), tenant=tenant, ttl_s=30))
    keys = context_keys(client, tenant)
    assert len(keys) == 2 + 3 * 6  # manifest, retrieval keys, 18 nodes
    assert {key_slot(name.encode()) for name in keys} == {key_slot(f"{{{tenant}:doc-1}}".encode())}
    head = f"sllm:{{{tenant}:doc-1}}:manifest"
    assert 29_000 < keys.pop(head) <= 30_000
    assert all(29_000 + PART_MARGIN_MS < ttl <= 30_000 + PART_MARGIN_MS for ttl in keys.values())


def test_a_use_restarts_the_expiry_of_every_key_together(store, client, tenant, make_tree):
    store.put("doc-1", encode_tree(make_tree(), tenant=tenant, ttl_s=30))
    for name in context_keys(client, tenant):
        client.pexpire(name, 5_000)
    store.open("doc-1", FP, tenant=tenant)
    ttls = context_keys(client, tenant)
    assert min(ttls.values()) > 29_000 and ttls[f"sllm:{{{tenant}:doc-1}}:manifest"] <= 30_000


def test_pin_persists_and_delete_removes_every_key(store, client, tenant, make_tree):
    store.put("doc-1", encode_tree(make_tree(seed=1), tenant=tenant, ttl_s=30))
    store.put("doc-1", encode_tree(make_tree(seed=2), tenant=tenant, ttl_s=30))  # retires the first
    store.touch("doc-1", tenant=tenant, pin=True)
    keys = context_keys(client, tenant)
    current = {name: ttl for name, ttl in keys.items() if ttl == -1}
    assert len(current) == 20
    assert all(0 < ttl <= GRACE_MS for name, ttl in keys.items() if name not in current)  # retired generation
    assert store.delete("doc-1", tenant=tenant) is True
    assert context_keys(client, tenant) == {}


def test_two_writers_of_one_id_never_leave_a_mixed_tree(redis_server, tenant, make_tree):
    trees = [make_tree(seed=seed) for seed in range(2)]
    encoded = [encode_tree(tree, tenant=tenant) for tree in trees]
    expected = [tree.fetch(ALL_NODES) for tree in trees]
    stores = [RedisStore(redis_server.url) for _ in range(3)]
    done, errors, reads = threading.Event(), [], []

    def write(i: int) -> None:
        for _ in range(25):
            stores[i].put("doc-1", encoded[i])

    def read() -> None:
        while not done.is_set():
            try:
                _, nodes = fetch_tree(stores[2], "doc-1", tenant)
            except ContextNotFound:
                continue  # not yet published
            except Exception as exc:
                errors.append(exc)
                return
            reads.append(sum(same_nodes(nodes, e) for e in expected))

    writers = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    reader = threading.Thread(target=read)
    for t in [reader, *writers]:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert errors == []
    assert reads and set(reads) == {1}, "every read must be exactly one writer's tree"
    _, nodes = fetch_tree(stores[2], "doc-1", tenant)
    assert sum(same_nodes(nodes, e) for e in expected) == 1
    for s in stores:
        s.close()


def test_a_writer_that_dies_before_publishing_leaves_nothing_visible(store, client, tenant, make_tree, monkeypatch):
    old = make_tree(seed=1)
    store.put("doc-1", encode_tree(old, tenant=tenant))

    def die(**_: object) -> None:
        raise redis.ConnectionError("the writer's connection dropped after staging its parts")

    monkeypatch.setattr(store, "_publish", die)
    published = set(context_keys(client, tenant))
    with pytest.raises(StoreUnavailable):
        store.put("doc-1", encode_tree(make_tree(seed=2), tenant=tenant))
    assert set(context_keys(client, tenant)) == published  # the failed write removed what it staged

    def unreachable(*_: object, **__: object) -> None:
        raise redis.ConnectionError("Redis went away before the writer could clean up")

    monkeypatch.setattr(store, "_undo_script", unreachable)
    with pytest.raises(StoreUnavailable):
        store.put("doc-2", encode_tree(make_tree(seed=2), tenant=tenant))
    monkeypatch.undo()
    _, nodes = fetch_tree(store, "doc-1", tenant)
    assert_same_nodes(nodes, old.fetch(ALL_NODES))
    with pytest.raises(ContextNotFound):
        store.open("doc-2", FP, tenant=tenant)
    staged = {name: ttl for name, ttl in context_keys(client, tenant).items() if name not in published}
    assert len(staged) == 19 and all(0 < ttl <= STAGING_TTL_MS for ttl in staged.values())  # gone in minutes


def test_a_full_redis_refuses_the_write_and_keeps_the_previous_version(make_redis_server, tenant, make_tree):
    server = make_redis_server()
    old, new = make_tree(seed=1), make_tree(seed=2)
    with RedisStore(server.url) as store, server.client() as client:
        store.put("doc-1", encode_tree(old, tenant=tenant))
        used = client.info("memory")["used_memory"]
        client.config_set("maxmemory", used + 4096)  # room for a few parts, not for the whole tree
        before = client.dbsize()
        with pytest.raises(ResourceExhausted, match="out of memory"):
            store.put("doc-1", encode_tree(new, tenant=tenant))
        assert client.dbsize() == before  # nothing of the failed write stays to keep Redis full
        client.config_set("maxmemory", 0)
        _, nodes = fetch_tree(store, "doc-1", tenant)
        assert_same_nodes(nodes, old.fetch(ALL_NODES))


def stored_keys(client, tenant: str) -> tuple[str, str, list[str]]:
    """The manifest key, the retrieval-keys key and the node keys of doc-1's current generation."""
    prefix = f"sllm:{{{tenant}:doc-1}}"
    gen = client.hget(f"{prefix}:manifest", "gen").decode()
    nodes = [f"{prefix}:{gen}:node:{c}:{n}" for c in range(3) for n in range(6)]
    return f"{prefix}:manifest", f"{prefix}:{gen}:rkeys", nodes


def stored_values(client, tenant: str) -> dict[str, tuple[bytes, Callable[[bytes], object]]]:
    """Every kind of value stored for doc-1: name -> (its bytes, how to overwrite them)."""
    head, rkeys, nodes = stored_keys(client, tenant)

    def field(name: str):
        return client.hget(head, name), lambda value: client.hset(head, name, value)

    def string(key: str):
        return client.get(key), lambda value: client.set(key, value, keepttl=True)

    return {
        "manifest": field("manifest"),
        "generation": field("gen"),
        "retrieval keys": string(rkeys),
        **{f"node {i}": string(name) for i, name in enumerate(nodes)},
    }


@pytest.mark.parametrize("truncate", [False, True], ids=["flipped byte", "truncated"])
def test_corruption_fuzzing_every_kind_of_key(store, client, tenant, make_tree, truncate):
    store.put("doc-1", encode_tree(make_tree(torch.bfloat16), tenant=tenant))
    rng = random.Random(int(truncate))
    failures = store.stats().counters.integrity_failures
    tries = 0
    for name, (original, write) in stored_values(client, tenant).items():
        for _ in range(4 if name.startswith("node") else 25):
            write(damage(original, rng, truncate))
            with pytest.raises(DataCorruption):
                fetch_tree(store, "doc-1", tenant)
            write(original)
            tries += 1
    assert store.stats().counters.integrity_failures == failures + tries
    fetch_tree(store, "doc-1", tenant)  # undamaged again: reads fine


def test_missing_parts_are_data_loss_and_a_missing_manifest_is_not_found(store, client, tenant, make_tree):
    store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
    head, rkeys, nodes = stored_keys(client, tenant)
    client.delete(nodes[10])
    with pytest.raises(DataCorruption, match="missing"):
        fetch_tree(store, "doc-1", tenant)
    client.delete(rkeys)
    with pytest.raises(DataCorruption, match="missing"):
        store.open("doc-1", FP, tenant=tenant)
    client.hdel(head, "gen")
    with pytest.raises(DataCorruption, match="damaged"):
        store.open("doc-1", FP, tenant=tenant)
    client.delete(head)
    with pytest.raises(ContextNotFound):
        store.open("doc-1", FP, tenant=tenant)


def test_a_reader_of_a_deleted_context_gets_not_found(store, tenant, make_tree):
    store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
    source = store.open("doc-1", FP, tenant=tenant)
    store.delete("doc-1", tenant=tenant)
    with pytest.raises(ContextNotFound, match="after it was opened"):
        source.fetch(ALL_NODES)


def test_a_context_deleted_while_being_opened_is_not_found_even_when_cached(store, tenant, make_tree):
    store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
    cache = DecodedCache()
    store.open("doc-1", FP, tenant=tenant, cache=cache).fetch(ALL_NODES)  # everything is cached now
    key = ContextKey.of(tenant, "doc-1")
    frame, reader = store._open(key)  # the manifest is read ...
    store.delete("doc-1", tenant=tenant)  # ... and the context deleted before the use is counted
    with pytest.raises(ContextNotFound):
        reader.use(codec.decode_manifest(frame), read_retrieval_keys=False)


def test_a_crash_with_append_only_persistence_loses_no_published_context(make_redis_server, tenant, make_tree):
    server = make_redis_server(appendonly=True)
    trees = {"expiring": make_tree(seed=1), "pinned": make_tree(torch.float16, seed=2)}
    with RedisStore(server.url) as store:
        store.put("expiring", encode_tree(trees["expiring"], tenant=tenant, ttl_s=3600))
        store.put("pinned", encode_tree(trees["pinned"], tenant=tenant, ttl_s=None))
        server.restart(kill=True)  # SIGKILL: no shutdown, only what the append-only file holds
        for name, tree in trees.items():
            _, nodes = fetch_tree(store, name, tenant)
            assert_same_nodes(nodes, tree.fetch(ALL_NODES))
        assert store.info("expiring", tenant=tenant).expires_in_s > 3500
        assert store.info("pinned", tenant=tenant).expires_in_s is None


def test_a_redis_that_is_down_is_unavailable_and_the_store_recovers(make_redis_server, tenant, make_tree):
    server = make_redis_server(appendonly=True, password="pw-s3cret")
    tree = make_tree()
    with RedisStore(server.url) as store:
        store.put("doc-1", encode_tree(tree, tenant=tenant))
        server.stop()
        calls = [
            lambda: store.open("doc-1", FP, tenant=tenant),
            lambda: store.put("doc-2", encode_tree(tree, tenant=tenant)),
            lambda: store.info("doc-1", tenant=tenant),
            lambda: store.touch("doc-1", tenant=tenant),
            lambda: store.delete("doc-1", tenant=tenant),
            store.ping,
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable, match="unavailable") as caught:
                call()
            assert f"127.0.0.1:{server.port}" in str(caught.value) and "pw-s3cret" not in str(caught.value)
        server.start()
        store.ping()
        _, nodes = fetch_tree(store, "doc-1", tenant)
        assert_same_nodes(nodes, tree.fetch(ALL_NODES))


def test_a_wrong_password_is_unavailable_without_revealing_it(make_redis_server):
    server = make_redis_server(password="right")
    with RedisStore(server.url.replace(":right@", ":wrong-pw@")) as store, pytest.raises(StoreUnavailable) as caught:
        store.ping()
    assert "wrong-pw" not in str(caught.value) and ":***@" in str(caught.value)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(make_redis_server, tmp_path, tenant, make_tree):
    server = make_redis_server(tls=TlsFiles.create(tmp_path))
    tree = make_tree()
    with open_store(server.url) as store:
        assert server.url.startswith("rediss://")
        store.put("doc-1", encode_tree(tree, tenant=tenant))
        _, nodes = fetch_tree(store, "doc-1", tenant)
        assert_same_nodes(nodes, tree.fetch(ALL_NODES))


def test_urls():
    assert redact("redis://user:pw@host:7000/2?password=pw&db=2") == "redis://user:***@host:7000/2?password=***&db=2"
    assert redact("rediss://:pw@[::1]:6380") == "rediss://:***@[::1]:6380"
    assert redact("redis://localhost") == "redis://localhost"
    with pytest.raises(InvalidInput):
        RedisStore("redis://localhost?socket_timeout=soon")


@pytest.mark.parametrize("part", ["manifest", "retrieval keys", "node"])
def test_a_key_of_the_wrong_type_is_data_loss_not_missing(store, client, tenant, make_tree, part):
    """A context key holding another type (another program's key of the same name, a damaged
    keyspace) is corruption of that context, never "not found"."""
    store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
    head, rkeys, nodes = stored_keys(client, tenant)
    key = {"manifest": head, "retrieval keys": rkeys, "node": nodes[3]}[part]
    client.delete(key)
    client.rpush(key, b"a list, not a string or a hash")
    with pytest.raises(DataCorruption, match="wrong type"):
        fetch_tree(store, "doc-1", tenant)
    if part == "manifest":
        for call in (store.info, store.touch, store.delete):
            with pytest.raises(DataCorruption, match="wrong type"):
                call("doc-1", tenant=tenant)


def test_a_usage_index_of_the_wrong_type_is_data_loss(store, client, tenant, make_tree):
    client.set(f"sllm:usage:{{{tenant}}}", b"a string, not a hash")
    with pytest.raises(DataCorruption, match="wrong type"):
        store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
    with pytest.raises(DataCorruption, match="wrong type"):
        store.usage(tenant)


def test_a_redis_loading_its_dataset_is_unavailable_with_a_retry_hint(store):
    """What redis-py raises while a restarted Redis reads its dataset back (a real one loads the
    suite's few keys too fast to catch in that state)."""
    with pytest.raises(StoreUnavailable, match="loading its dataset; retry in a few seconds"), store._errors():
        raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")
