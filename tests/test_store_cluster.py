"""The Redis store on a real Redis Cluster (three primaries on loopback, made by redis-cli).

Contexts spread over the primaries, are read and deleted through any node, and stay whole while
an operator moves every hash slot of one primary to another under readers: each read then either
answers exactly as before or fails as StoreUnavailable (UNAVAILABLE: retry), never as lost or
corrupt data.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from redis_server import RedisClusterServers

from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.errors import ContextNotFound, StoreUnavailable
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import open_store
from sharedllm.common.store.redis_store import STAGING_TTL_MS

pytestmark = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli is not installed")
TEXT = "Naomi went with Ruth to Bethlehem, and Boaz saw her in the field of barley. " * 12
PARAMS = SamplingParams(max_new_tokens=6)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with RedisClusterServers(tmp_path_factory.mktemp("cluster")) as servers:
        yield servers


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter) -> Engine:
    return Engine.load(model=str(tiny_model_dir), adapter=str(tiny_adapter))


def answer(runtime: ContextRuntime, context_id: str) -> str:
    return run_to_end(runtime.generate(context_id, "Who is Naomi?", PARAMS)).text


def test_contexts_spread_over_the_primaries_and_are_read_through_any_node(cluster, engine):
    writer = ContextRuntime(engine, open_store(cluster.url(0)), decoded_cache_bytes=0)
    ids = [writer.compress_text(f"{i} {TEXT}", context_id=f"spread-{i}").context_id for i in range(8)]
    holders = [len(node.client().keys("sllm:*spread-*:manifest")) for node in cluster.nodes]
    assert sum(holders) == 8 and sum(1 for n in holders if n) >= 2  # one slot per context, several primaries

    reader = ContextRuntime(engine, open_store(cluster.url(2)), decoded_cache_bytes=0)
    for context_id in ids:
        assert answer(reader, context_id) == answer(writer, context_id)
        assert reader.store.info(context_id).manifest.n_tokens > 0
    assert reader.store.delete(ids[0]) is True
    with pytest.raises(ContextNotFound):
        writer.store.info(ids[0])


def test_moving_every_slot_of_a_primary_under_readers_loses_no_context(cluster, engine):
    runtime = ContextRuntime(engine, open_store(cluster.url(1)), decoded_cache_bytes=0)
    ids = [runtime.compress_text(f"{i} {TEXT}", context_id=f"moving-{i}").context_id for i in range(12)]
    expected = {context_id: answer(runtime, context_id) for context_id in ids}
    source = max(range(len(cluster.nodes)), key=lambda i: len(cluster.nodes[i].client().keys("sllm:*moving-*")))
    target = (source + 1) % len(cluster.nodes)
    errors: list[BaseException] = []

    def reshard() -> None:
        try:
            cluster.reshard(source, target, cluster.slots_of(source))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    mover = threading.Thread(target=reshard)
    mover.start()
    reads = unavailable = 0
    while mover.is_alive():
        for context_id in ids:
            try:
                assert answer(runtime, context_id) == expected[context_id]
                reads += 1
            except StoreUnavailable:
                unavailable += 1  # retryable: the client gives the status UNAVAILABLE
    mover.join()
    assert not errors, errors
    assert cluster.slots_of(source) == 0 and reads > 0
    for context_id in ids:  # everything is where the cluster now says, whole
        assert answer(runtime, context_id) == expected[context_id]
    other = ContextRuntime(engine, open_store(cluster.url(source)), decoded_cache_bytes=0)
    assert all(answer(other, context_id) == expected[context_id] for context_id in ids)


def test_a_primary_failover_keeps_every_acknowledged_context(tmp_path, engine):
    """Three primaries with a replica each; contexts written with min_replicas=1; the primary that
    holds the most is SIGKILLed under readers and writers. Its replica takes over: every context
    acknowledged before the kill answers as before, a call during the failover either succeeds or
    fails UNAVAILABLE (and succeeds when tried again), and no context is left partly written."""
    with RedisClusterServers(tmp_path, masters=3, replicas=1) as cluster:
        store = open_store(cluster.url(0), min_replicas=1, replica_timeout_s=5)
        runtime = ContextRuntime(engine, store, decoded_cache_bytes=0)
        ids = [runtime.compress_text(f"{i} {TEXT}", context_id=f"failover-{i}").context_id for i in range(12)]
        expected = {context_id: answer(runtime, context_id) for context_id in ids}
        victim = max(cluster.primaries(), key=lambda n: len(n.client().keys("sllm:*failover-*:manifest")))
        held = len(victim.client().keys("sllm:*failover-*:manifest"))
        assert held > 0
        victim.stop(kill=True)

        reads = unavailable = 0
        written: list[str] = []
        deadline = time.monotonic() + 60
        pending = set(ids)
        while pending:  # until every context has answered again
            assert time.monotonic() < deadline, f"{len(pending)} contexts unreadable 60 s after the kill"
            for context_id in sorted(pending):
                try:
                    assert answer(runtime, context_id) == expected[context_id]
                    pending.discard(context_id)
                    reads += 1
                except StoreUnavailable:
                    unavailable += 1  # the client gives UNAVAILABLE: retry
            try:
                n = len(written)
                written.append(runtime.compress_text(f"after {n} {TEXT}", context_id=f"written-{n}").context_id)
            except StoreUnavailable:
                unavailable += 1
        assert reads == len(ids) and len(cluster.primaries()) == 3  # the replica was promoted
        for context_id in written:  # acknowledged during or after the failover: whole too
            assert answer(runtime, context_id)
        for node in cluster.primaries():  # a part of no published generation is a failed write's: it expires
            client = node.client()
            for name in (k.decode() for k in client.keys("sllm:{*}:*:*")):
                tag, gen = name.split("}:", 1)[0] + "}", name.split("}:", 1)[1].split(":", 1)[0]
                if gen in ("manifest", "retired"):
                    continue
                published = {client.hget(f"{tag}:manifest", "gen"), *client.hkeys(f"{tag}:retired")}
                assert gen.encode() in published or 0 < client.pttl(name) <= STAGING_TTL_MS, name
