"""What a hostile or unlucky client finds, each reproduced against real parts: a huge upload, a
store that is frozen or gone, the same document sent again, a tenant filling the store.

Real redis-server processes, real gRPC servers on loopback, and a served compressor process
whose memory is read from /proc while it refuses a 60 MB upload.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_stack import SERVING, EventLoopThread, InProcessServer, server_config, status_of, wait_for_health
from redis_server import REDIS_SERVER, free_port
from test_codec import encode_tree
from transformers import AutoTokenizer

from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.token_budget import TokenBudget, max_document_bytes
from sharedllm.common.errors import ContextNotFound, InvalidInput, QuotaExceeded, StoreUnavailable
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2 as cpb
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2_grpc, decoder_pb2_grpc
from sharedllm.common.generated.sharedllm.v1 import decoder_pb2 as dpb
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import MemoryStore, Quota, RedisStore, TenantQuotas, TenantUsage, open_store
from sharedllm.common.store.base import ContextKey
from sharedllm.common.telemetry.memory import peak_resident_bytes, resident_bytes
from sharedllm.compressor_service.server import SPEC as COMPRESSOR
from sharedllm.decoder_service.server import SPEC as DECODER

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]
ROOT = Path(__file__).resolve().parents[1]
WORDS = "The miller's daughter walked to Kellynch with a basket of pears and a letter for the vicar."
DOCUMENT = " ".join(f"{WORDS} Line {i}." for i in range(30))  # ~900 tokens: 15 chunks of the tiny tree


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter) -> Engine:
    return Engine.load(model=str(tiny_model_dir), adapter=tiny_adapter)


@pytest.fixture(scope="module")
def loop():
    thread = EventLoopThread()
    yield thread
    thread.close()


def context_keys(url: str) -> int:
    with RedisStore(url) as store:
        return store._redis.dbsize()


# --- Defect 2: the size of an upload is bounded by the token limit, and so is its cost ---------


def test_the_token_budget_counts_what_whole_tokenisation_counts_and_stops_early(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = " ".join(f"{WORDS} ({i}) \n\n  indented   {i * 7919}" for i in range(3000))
    exact = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    limit = exact // 6
    budget = TokenBudget(tokenizer, limit=limit, block_chars=4096)
    with pytest.raises(InvalidInput, match=f"more than {limit} tokens"):
        for start in range(0, len(text), 1000):
            budget.add(text[start : start + 1000])
    assert budget.tokens < limit + 2 * 4096  # stopped within a block of the limit, not at the end
    whole = TokenBudget(tokenizer, limit=exact, block_chars=4096)
    for start in range(0, len(text), 777):
        whole.add(text[start : start + 777])
    whole.finish()
    assert abs(whole.tokens - exact) <= 2 * whole._blocks  # whitespace cuts: the count of the whole text
    assert max_document_bytes(131_072) == 2 << 20  # the default byte limit at 128K tokens: 2 MiB
    short = TokenBudget(tokenizer, limit=len(WORDS.encode()))
    short.add(WORDS)
    short.finish()
    assert short.tokens == 0  # no more bytes than the limit has tokens: nothing to count


def test_the_token_budget_bounds_tokens_in_any_script(tiny_model_dir):
    """CJK text has more tokens than characters: counting must not wait for a character count."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "春眠不覺曉，處處聞啼鳥。夜來風雨聲，花落知多少。" * 4000
    limit = 10_000
    budget = TokenBudget(tokenizer, limit=limit, block_chars=4096)
    with pytest.raises(InvalidInput, match=f"more than {limit} tokens"):
        budget.add(text)
    assert budget.tokens < limit + 2 * 4096 and budget._characters < len(text) // 4


def test_a_60_mb_upload_is_refused_early_and_costs_little_memory(tiny_model_dir, tiny_adapter, tmp_path):
    """The probe's 60 MB CompressStream held a worker for 93 s and peaked at 10 GB."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "sharedllm", "serve", "compressor", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", "memory://",
        "--torch-threads", "1", "--drain-delay-s", "0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "compressor.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_health(target, SERVING, timeout=180)
        with grpc.insecure_channel(target) as channel:
            stub = compressor_pb2_grpc.CompressorServiceStub(channel)
            before = resident_bytes(process.pid)
            piece = (WORDS + "\n").encode() * ((1 << 20) // len(WORDS))  # ~1 MiB of prose
            started = time.monotonic()
            messages = (cpb.CompressStreamRequest(text=piece) for _ in range(60))
            with pytest.raises(grpc.RpcError) as refused:
                stub.CompressStream(messages, timeout=60)
            bytes_s = time.monotonic() - started
            # Within the byte limit (1 MiB for this model's 65,536 tokens) but far over the token
            # limit: 2 bytes a token. Refused once the counted tokens pass the limit.
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as counted:
                stub.CompressStream(iter([cpb.CompressStreamRequest(text=b"a " * 500_000)]), timeout=60)
            tokens_s = time.monotonic() - started
            after = {"rss": resident_bytes(process.pid), "peak": peak_resident_bytes(process.pid)}
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 1048576 (for 65536 tokens)" in refused.value.details()
    assert counted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 65536 tokens" in counted.value.details()
    print(f"refusals: {bytes_s:.2f} s and {tokens_s:.2f} s; resident bytes before {before}, after {after}")
    assert bytes_s < 10 and tokens_s < 10
    assert after["peak"] - before < 256 << 20  # peak: < 256 MiB above the idle server
    assert after["rss"] - before < 128 << 20


# --- Fail fast when the store is gone or frozen -----------------------------------------------


def test_a_compress_notices_a_lost_store_before_computing(engine, make_redis_server, monkeypatch):
    redis = make_redis_server()
    runtime = ContextRuntime(engine, open_store(redis.url, timeout_s=0.5, retries=0))
    compressions = []
    monkeypatch.setattr(engine, "compress", lambda *a, **k: compressions.append(a) or pytest.fail("computed"))
    redis.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        runtime.compress_text(DOCUMENT)
    assert compressions == [] and time.monotonic() - started < 3


@contextmanager
def services(loop, tiny_model_dir, tiny_adapter, store_url: str, *flags: str):
    """Both services in this process on `store_url`; yields their stubs."""
    config = server_config(
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", store_url,
        "--health-interval-s", "0.2", "--drain-delay-s", "0", *flags,
    )  # fmt: skip
    with InProcessServer(loop, COMPRESSOR, config) as compressor, InProcessServer(loop, DECODER, config) as decoder:
        for server in (compressor, decoder):
            wait_for_health(server.target, SERVING)
        with grpc.insecure_channel(compressor.target) as c, grpc.insecure_channel(decoder.target) as d:
            yield compressor_pb2_grpc.CompressorServiceStub(c), decoder_pb2_grpc.DecoderServiceStub(d)


def test_a_frozen_store_frees_the_call_in_seconds(loop, tiny_model_dir, tiny_adapter, make_redis_server):
    redis = make_redis_server()
    flags = ("--store-timeout-s", "0.5", "--store-retries", "1")
    with services(loop, tiny_model_dir, tiny_adapter, redis.url, *flags) as (compressor, decoder):
        compress, generate = compressor.Compress, decoder.Generate
        context_id = compress(cpb.CompressRequest(text=DOCUMENT.encode())).context.context_id
        question = dpb.GenerateRequest(context_id=context_id, prompt="Who walked?", max_new_tokens=4)
        redis.freeze()
        try:
            for call in (
                lambda: compress(cpb.CompressRequest(text=("Another. " + DOCUMENT).encode()), timeout=30),
                lambda: list(generate(question, timeout=30)),
            ):
                started = time.monotonic()
                assert status_of(call) == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 5  # 2 tries of 0.5 s and a health ping, not 30 s
        finally:
            redis.thaw()
        assert len(list(generate(question, timeout=30))) > 0  # and it recovers


# --- Deduplication -------------------------------------------------------------------------------


def test_the_same_document_is_stored_once_per_tenant(engine, redis_server, tenant):
    runtime = ContextRuntime(engine, open_store(redis_server.url), default_ttl_s=600)
    first = runtime.compress_text(DOCUMENT, tenant=tenant)
    keys = context_keys(redis_server.url)
    again = runtime.compress_text(DOCUMENT, tenant=tenant)
    assert (again.context_id, again.reused, first.reused) == (first.context_id, True, False)
    assert again.timings.compress_s == 0 and again.stored_bytes == first.stored_bytes
    assert context_keys(redis_server.url) == keys  # nothing written twice
    other_tenant = runtime.compress_text(DOCUMENT, tenant=tenant + "-b")
    assert other_tenant.context_id != first.context_id and not other_tenant.reused
    other_text = runtime.compress_text(DOCUMENT + " One more line.", tenant=tenant)
    assert other_text.context_id != first.context_id and not other_text.reused
    named = runtime.compress_text(DOCUMENT, tenant=tenant, context_id="named")
    assert named.context_id == "named" and not named.reused  # a caller that names its id gets its own

    # Lifetimes: a reuse lives at least as long as asked.
    assert not runtime.compress_text(DOCUMENT, tenant=tenant, ttl_s=3600).reused  # longer: stored anew
    assert runtime.store.info(first.context_id, tenant=tenant).expires_in_s > 3000
    assert runtime.compress_text(DOCUMENT, tenant=tenant, ttl_s=60).reused  # shorter: the stored one
    pinned = runtime.compress_text(DOCUMENT, tenant=tenant, pin=True)
    assert pinned.reused and runtime.store.info(first.context_id, tenant=tenant).expires_in_s is None
    runtime.store.delete(first.context_id, tenant=tenant)
    assert not runtime.compress_text(DOCUMENT, tenant=tenant).reused  # deleted: compressed again


# --- Quotas -------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def any_store(request, redis_server):
    store = MemoryStore() if request.param == "memory" else RedisStore(redis_server.url)
    yield store
    store.close()


def test_quotas_count_contexts_and_bytes_per_tenant(any_store, tenant, make_tree):
    store = any_store
    one = encode_tree(make_tree(), tenant=tenant)
    quota = Quota(max_contexts=2)
    store.put("a", one, quota)
    store.put("b", one, quota)
    store.put("b", one, quota)  # replacing a context does not add one
    with pytest.raises(QuotaExceeded, match=rf"tenant '{tenant}' has 2 stored contexts; its quota is 2"):
        store.put("c", one, quota)
    store.put("c", encode_tree(make_tree(), tenant=tenant + "-b"), quota)  # another tenant has its own
    assert store.usage(tenant).contexts == 2 and store.usage(tenant).stored_bytes == 2 * one.nbytes
    store.delete("a", tenant=tenant)
    store.put("c", one, quota)
    bytes_quota = Quota(max_bytes=3 * one.nbytes - 1)
    with pytest.raises(QuotaExceeded, match=f"stores {2 * one.nbytes} bytes; this context needs {one.nbytes} more"):
        store.put("d", one, bytes_quota)
    with pytest.raises(ContextNotFound):
        store.info("d", tenant=tenant)  # nothing of the refused write stays
    assert store.usage(tenant).contexts == 2


def test_a_write_in_progress_keeps_its_place_in_the_quota(redis_server, tenant, make_tree):
    """A usage report or a refused writer prunes entries of contexts that do not exist; a context
    still being written does not exist yet, and must not be pruned (it would let a second writer
    past the quota)."""
    with RedisStore(redis_server.url) as store:
        quota = Quota(max_contexts=1)
        one = encode_tree(make_tree(), tenant=tenant)
        pending, _ = store._record_usage(ContextKey(tenant, "in-progress"), one.nbytes, quota)
        assert store.usage(tenant).contexts == 1  # counted, and not pruned by the report
        with pytest.raises(QuotaExceeded):
            store.put("second", one, quota)
        store._swap_usage(ContextKey(tenant, "in-progress"), pending, b"")  # the writer gives up
        store.put("second", one, quota)
        store.put("second", one, quota)  # replacing at the quota is allowed
        assert store.usage(tenant) == TenantUsage(1, one.nbytes)
        assert store.usage(tenant, excluding="second") == TenantUsage(0, 0)
        store.delete("second", tenant=tenant)
        assert store.usage(tenant) == TenantUsage(0, 0)


def test_without_a_quota_expired_entries_do_not_pile_up(redis_server, tenant, make_tree):
    with RedisStore(redis_server.url) as store:
        for i in range(20):
            store.put(f"short-{i}", encode_tree(make_tree(), tenant=tenant, ttl_s=0.05))
        time.sleep(0.2)
        for i in range(20):
            store.put(f"kept-{i}", encode_tree(make_tree(), tenant=tenant))
        entries = store._redis.hlen(f"sllm:usage:{{{tenant}}}")
        assert entries < 40  # writes prune a sample of expired entries as they go
        assert store.usage(tenant).contexts == 20 == store._redis.hlen(f"sllm:usage:{{{tenant}}}")


def test_expired_contexts_leave_the_quota(redis_server, tenant, make_tree):
    with RedisStore(redis_server.url) as store:
        quota = Quota(max_contexts=1)
        store.put("short", encode_tree(make_tree(), tenant=tenant, ttl_s=0.2), quota)
        with pytest.raises(QuotaExceeded):
            store.put("next", encode_tree(make_tree(), tenant=tenant), quota)
        time.sleep(0.3)
        with pytest.raises(ContextNotFound):
            store.info("short", tenant=tenant)
        store.put("next", encode_tree(make_tree(), tenant=tenant), quota)  # the expired one was pruned
        assert store.usage(tenant).contexts == 1


def test_a_tenant_over_its_quota_is_refused_before_computing(engine, redis_server, tenant, monkeypatch):
    runtime = ContextRuntime(engine, open_store(redis_server.url), quotas=TenantQuotas(Quota(max_contexts=1)))
    runtime.compress_text(DOCUMENT, tenant=tenant, context_id="named")
    runtime.compress_text(DOCUMENT, tenant=tenant, context_id="named")  # replacing it at the quota is allowed
    runtime.store.delete("named", tenant=tenant)
    runtime.compress_text(DOCUMENT, tenant=tenant)
    monkeypatch.setattr(engine, "compress", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(QuotaExceeded, match="quota is 1"):
        runtime.compress_text("A second document. " + DOCUMENT, tenant=tenant)
    assert runtime.compress_text(DOCUMENT, tenant=tenant).reused  # the stored one is still handed back


def test_tenants_file_gives_tenants_their_own_quota(tmp_path):
    path = tmp_path / "quotas"
    path.write_text("# tenant limits\nacme max_contexts=10 max_bytes=1000000\nfree max_bytes=0\n")
    quotas = TenantQuotas.from_file(path, Quota(max_contexts=2))
    assert quotas.of("acme") == Quota(10, 1_000_000) and quotas.of("free") == Quota() and quotas.of("x") == Quota(2)
    for bad, message in (
        ("acme max_contexts=ten", "expected max_contexts=N"),
        ("a/b", "tenant at"),
        ("a\na", "already"),
    ):
        path.write_text(bad + "\n")
        with pytest.raises(InvalidInput, match=message):
            TenantQuotas.from_file(path, Quota())


def test_quota_over_grpc_and_usage_in_server_info(loop, tiny_model_dir, tiny_adapter, make_redis_server, tmp_path):
    redis = make_redis_server()
    (tmp_path / "quotas").write_text("default max_contexts=1\n")  # the tenant without an API key
    flags = ("--tenant-max-contexts", "5", "--tenant-quotas-file", str(tmp_path / "quotas"))
    with services(loop, tiny_model_dir, tiny_adapter, redis.url, *flags) as (compressor, decoder):
        compress = compressor.Compress
        first = compress(cpb.CompressRequest(text=DOCUMENT.encode())).context
        assert compress(cpb.CompressRequest(text=DOCUMENT.encode())).context.reused
        with pytest.raises(grpc.RpcError) as refused:
            compress(cpb.CompressRequest(text=("Another. " + DOCUMENT).encode()))
        info = decoder.GetServerInfo(dpb.GetServerInfoRequest())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "has 1 stored contexts; its quota is 1" in refused.value.details()
    usage = info.usage
    assert (usage.tenant, usage.contexts, usage.max_contexts, usage.max_bytes) == ("default", 1, 1, 0)
    assert usage.stored_bytes == first.stored_bytes
