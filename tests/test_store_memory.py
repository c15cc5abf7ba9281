"""The store contract (run here on the memory store, and on Redis in test_store_redis.py), the
memory store's byte bound and LRU, and context ids."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest
import torch
from test_codec import FP, bits, encode_tree

from sharedllm.common.errors import (
    ContextNotFound,
    DataCorruption,
    IncompatibleContext,
    InvalidInput,
    ResourceExhausted,
)
from sharedllm.common.store import (
    ContextStore,
    Fingerprints,
    MemoryStore,
    content_context_id,
    new_context_id,
    open_store,
    validate_name,
)
from sharedllm.common.store.decoded_cache import DecodedCache

ALL_NODES = torch.arange(6).repeat(3, 1)  # every node of the 3-chunk test trees


def fetch_tree(store: ContextStore, context_id: str, tenant: str):
    """Read a whole context back through the decoder's path (open, then fetch every node)."""
    source = store.open(context_id, FP, tenant=tenant)
    return source, source.fetch(ALL_NODES)


def same_nodes(a, b) -> bool:
    """Bit-exact equality of two SelectedNodes."""
    return all(torch.equal(bits(getattr(a, f)), bits(getattr(b, f))) for f in ("keys", "values")) and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("counts", "chunk_of_row")
    )


def assert_same_nodes(a, b) -> None:
    assert same_nodes(a, b)


class StoreContract:
    """What every ContextStore guarantees. Subclasses provide the fixtures `store` and
    `elapse(seconds)` (a fake clock or real sleeping)."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    def test_round_trip_reads_only_the_selected_nodes(self, store, tenant, make_tree, dtype):
        tree = make_tree(dtype)
        encoded = encode_tree(tree, tenant=tenant)
        store.put("doc-1", encoded)
        source = store.open("doc-1", FP, tenant=tenant)
        assert source.config == tree.config and source.chunk_lengths == tree.chunk_lengths
        assert torch.equal(bits(source.retrieval_keys), bits(tree.retrieval_keys))
        assert source.bytes_read == len(encoded.manifest_frame) + len(encoded.retrieval_keys)

        selection = torch.tensor([[0, 2, 5], [1, 3, 3], [0, 1, 4]])  # node 3 of chunk 1 twice: read once
        before = source.bytes_read
        assert_same_nodes(source.fetch(selection), tree.fetch(selection))
        wanted = {b * 6 + n for b, row in enumerate(selection.tolist()) for n in row}
        assert source.bytes_read - before == sum(len(encoded.nodes[i]) for i in wanted)
        assert source.bytes_read < encoded.nbytes
        assert_same_nodes(source.fetch(ALL_NODES), tree.fetch(ALL_NODES))

    def test_info_reports_manifest_size_and_expiry(self, store, tenant, make_tree):
        encoded = encode_tree(make_tree(), tenant=tenant, ttl_s=30)
        store.put("doc-1", encoded)
        info = store.info("doc-1", tenant=tenant)
        assert info.manifest == encoded.manifest and info.stored_bytes == encoded.nbytes
        assert 25 < info.expires_in_s <= 30
        store.put("doc-2", encode_tree(make_tree(), tenant=tenant, ttl_s=None))
        assert store.info("doc-2", tenant=tenant).expires_in_s is None

    def test_other_tenants_and_unknown_ids_are_not_found(self, store, tenant, make_tree):
        store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
        for context_id, other in (("doc-1", f"{tenant}-other"), ("doc-2", tenant)):
            with pytest.raises(ContextNotFound):
                store.open(context_id, FP, tenant=other)
            with pytest.raises(ContextNotFound):
                store.info(context_id, tenant=other)
            with pytest.raises(ContextNotFound):
                store.touch(context_id, tenant=other)
            assert store.delete(context_id, tenant=other) is False
        store.open("doc-1", FP, tenant=tenant)

    @pytest.mark.parametrize("bad", ["", "x" * 129, "a:b", "a{b}", "a b", "dé", "a/b"])
    def test_malformed_ids_and_tenants_are_invalid(self, store, bad):
        with pytest.raises(InvalidInput):
            store.open(bad, FP)
        with pytest.raises(InvalidInput):
            store.open("doc-1", FP, tenant=bad)

    def test_other_model_or_adapter_is_incompatible(self, store, tenant, make_tree):
        store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
        with pytest.raises(IncompatibleContext):
            store.open("doc-1", Fingerprints("model-a", "adapter-b"), tenant=tenant)

    def test_expires_after_its_lifetime_and_every_use_restarts_it(self, store, elapse, tenant, make_tree):
        store.put("doc-1", encode_tree(make_tree(), tenant=tenant, ttl_s=1.0))
        elapse(0.6)
        store.open("doc-1", FP, tenant=tenant)  # a use: one more second from now
        elapse(0.6)
        store.touch("doc-1", tenant=tenant)  # so is a touch
        elapse(0.6)
        store.info("doc-1", tenant=tenant)  # alive 1.8 s after it was stored; info is not a use
        elapse(0.6)
        with pytest.raises(ContextNotFound):
            store.open("doc-1", FP, tenant=tenant)

    def test_pinned_context_never_expires(self, store, elapse, tenant, make_tree):
        tree = make_tree()
        store.put("doc-1", encode_tree(tree, tenant=tenant, ttl_s=1.0))
        store.touch("doc-1", tenant=tenant, pin=True)
        elapse(1.3)
        assert store.info("doc-1", tenant=tenant).expires_in_s is None
        store.touch("doc-1", tenant=tenant)  # restarting a pinned context's expiry keeps it pinned
        _, nodes = fetch_tree(store, "doc-1", tenant)
        assert_same_nodes(nodes, tree.fetch(ALL_NODES))
        assert store.info("doc-1", tenant=tenant).expires_in_s is None

    def test_delete_removes_the_context(self, store, tenant, make_tree):
        store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
        assert store.delete("doc-1", tenant=tenant) is True
        with pytest.raises(ContextNotFound):
            store.open("doc-1", FP, tenant=tenant)
        assert store.delete("doc-1", tenant=tenant) is False

    def test_replacing_is_whole_and_an_open_reader_keeps_its_version(self, store, tenant, make_tree):
        old, new = make_tree(seed=1), make_tree(seed=2)
        store.put("doc-1", encode_tree(old, tenant=tenant))
        reader = store.open("doc-1", FP, tenant=tenant)
        store.put("doc-1", encode_tree(new, tenant=tenant))
        assert_same_nodes(reader.fetch(ALL_NODES), old.fetch(ALL_NODES))
        _, nodes = fetch_tree(store, "doc-1", tenant)
        assert_same_nodes(nodes, new.fetch(ALL_NODES))

    def test_damaged_parts_are_corruption_on_read(self, store, tenant, make_tree):
        encoded = encode_tree(make_tree(), tenant=tenant)
        flip = bytes([encoded.nodes[7][-1] ^ 1])
        damaged = (*encoded.nodes[:7], encoded.nodes[7][:-1] + flip, *encoded.nodes[8:])
        store.put("node", dataclasses.replace(encoded, nodes=damaged))
        store.put("rkeys", dataclasses.replace(encoded, retrieval_keys=encoded.retrieval_keys[:-8]))
        failures = store.stats().counters.integrity_failures
        source = store.open("node", FP, tenant=tenant)
        source.fetch(torch.tensor([[0], [0], [0]]))  # the damaged node (chunk 1, node 1) is not read
        with pytest.raises(DataCorruption, match="node 1 of chunk 1"):
            source.fetch(torch.tensor([[0], [1], [0]]))
        with pytest.raises(DataCorruption, match="retrieval keys"):
            store.open("rkeys", FP, tenant=tenant)
        assert store.stats().counters.integrity_failures == failures + 2

    def test_a_selection_must_fit_the_tree(self, store, tenant, make_tree):
        store.put("doc-1", encode_tree(make_tree(), tenant=tenant))
        source = store.open("doc-1", FP, tenant=tenant)
        for selection in (torch.zeros(2, 3, dtype=torch.long), torch.full((3, 1), 6), torch.zeros(3, 1)):
            with pytest.raises(InvalidInput):
                source.fetch(selection)

    def test_a_decoded_cache_serves_repeat_reads_and_never_a_stale_version(self, store, elapse, tenant, make_tree):
        old, new = make_tree(seed=1), make_tree(seed=2)
        encoded = encode_tree(old, tenant=tenant, ttl_s=1.0)
        store.put("doc-1", encoded)
        cache = DecodedCache()
        first = store.open("doc-1", FP, tenant=tenant, cache=cache)
        assert_same_nodes(first.fetch(ALL_NODES), old.fetch(ALL_NODES))
        assert first.bytes_read == encoded.nbytes and first.cached_nodes == 0
        elapse(0.6)
        repeat = store.open("doc-1", FP, tenant=tenant, cache=cache)  # still a use: one more second from now
        assert_same_nodes(repeat.fetch(ALL_NODES), old.fetch(ALL_NODES))
        assert torch.equal(bits(repeat.retrieval_keys), bits(old.retrieval_keys))
        assert repeat.bytes_read == len(encoded.manifest_frame) and repeat.cached_nodes == 18
        elapse(0.6)
        store.open("doc-1", FP, tenant=tenant, cache=cache)  # alive 1.2 s after it was stored
        store.put("doc-1", encode_tree(new, tenant=tenant))
        replaced = store.open("doc-1", FP, tenant=tenant, cache=cache)
        assert_same_nodes(replaced.fetch(ALL_NODES), new.fetch(ALL_NODES))
        assert torch.equal(bits(replaced.retrieval_keys), bits(new.retrieval_keys))
        store.delete("doc-1", tenant=tenant)
        with pytest.raises(ContextNotFound):
            store.open("doc-1", FP, tenant=tenant, cache=cache)

    def test_a_cached_entry_that_does_not_fit_the_manifest_is_replaced_from_the_store(self, store, tenant, make_tree):
        tree = make_tree()
        encoded = encode_tree(tree, tenant=tenant)
        store.put("doc-1", encoded)
        cache = DecodedCache()
        manifest = encoded.manifest
        wrong = {"keys": torch.zeros(1), "values": torch.zeros(1)}  # what a bug might leave there
        cache.put(tenant, manifest.node_sha256[0], wrong)  # wrong shapes
        cache.put(tenant, manifest.retrieval_keys_sha256, wrong)  # wrong names
        source = store.open("doc-1", FP, tenant=tenant, cache=cache)
        assert torch.equal(bits(source.retrieval_keys), bits(tree.retrieval_keys))
        assert_same_nodes(source.fetch(ALL_NODES), tree.fetch(ALL_NODES))
        assert source.cached_nodes == 0
        assert store.open("doc-1", FP, tenant=tenant, cache=cache).fetch(ALL_NODES) is not None

    def test_the_decoded_cache_is_per_tenant(self, store, tenant, make_tree):
        tree, cache = make_tree(), DecodedCache()
        for owner in (tenant, f"{tenant}-other"):
            store.put("doc-1", encode_tree(tree, tenant=owner))
            source = store.open("doc-1", FP, tenant=owner, cache=cache)
            source.fetch(ALL_NODES)
            assert source.cached_nodes == 0  # the other tenant's identical nodes are not shared

    def test_stats_count_bytes_written_and_read(self, store, tenant, make_tree):
        before = store.stats().counters
        encoded = encode_tree(make_tree(), tenant=tenant)
        store.put("doc-1", encoded)
        source, _ = fetch_tree(store, "doc-1", tenant)
        after = store.stats().counters
        assert after.bytes_written - before.bytes_written == encoded.nbytes
        assert after.bytes_read - before.bytes_read == source.bytes_read == encoded.nbytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class TestMemoryStoreContract(StoreContract):
    @pytest.fixture
    def store(self, clock):
        return MemoryStore(clock=clock)

    @pytest.fixture
    def elapse(self, clock):
        return clock.advance


def test_lru_eviction_keeps_the_store_within_its_byte_bound(make_tree):
    encoded = encode_tree(make_tree())
    store = MemoryStore(max_bytes=int(2.5 * encoded.nbytes))
    store.put("a", encoded)
    store.put("b", encoded)
    store.open("a", FP, tenant="acme")  # b is now the least recently used
    store.put("c", encoded)
    with pytest.raises(ContextNotFound):
        store.open("b", FP, tenant="acme")
    store.open("a", FP, tenant="acme")
    store.open("c", FP, tenant="acme")
    stats = store.stats()
    assert (stats.contexts, stats.stored_bytes, stats.counters.evictions) == (2, 2 * encoded.nbytes, 1)
    store.put("c", encoded)  # replacing does not count twice
    assert store.stats().stored_bytes == 2 * encoded.nbytes


def test_a_context_larger_than_the_store_is_refused(make_tree):
    encoded = encode_tree(make_tree())
    with pytest.raises(ResourceExhausted, match="max_bytes"):
        MemoryStore(max_bytes=encoded.nbytes - 1).put("a", encoded)


def test_concurrent_use_is_safe(make_tree):
    encoded = encode_tree(make_tree())
    store = MemoryStore(max_bytes=5 * encoded.nbytes)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            context_id = f"doc-{rng.randrange(8)}"
            try:
                action = rng.choice(("put", "open", "delete"))
                if action == "put":
                    store.put(context_id, encoded)
                elif action == "open":
                    store.open(context_id, FP, tenant="acme").fetch(ALL_NODES)
                else:
                    store.delete(context_id, tenant="acme")
            except ContextNotFound:
                pass
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = store.stats()
    assert stats.stored_bytes == stats.contexts * encoded.nbytes <= 5 * encoded.nbytes


def test_open_store_parses_memory_urls():
    assert open_store("memory://?max_bytes=1234").stats().capacity_bytes == 1234
    assert isinstance(open_store(), MemoryStore)
    for url in ("memory://?max_bytes=lots", "memory://?size=1", "ftp://host"):
        with pytest.raises(InvalidInput):
            open_store(url)


def test_new_ids_are_unguessable_and_valid():
    ids = {new_context_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(validate_name(i, "id") and len(i) >= 22 for i in ids)  # >= 128 bits of base64


def test_content_ids_are_reproducible_and_salted_by_tenant():
    doc = b"model|adapter|token ids"
    assert content_context_id("acme", doc) == content_context_id("acme", doc)
    assert content_context_id("acme", doc) != content_context_id("globex", doc)
    assert content_context_id("acme", doc) != content_context_id("acme", doc + b"!")
    validate_name(content_context_id("acme", doc), "id")
    with pytest.raises(InvalidInput):
        content_context_id("a:b", doc)
