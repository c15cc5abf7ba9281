"""Several documents in one question, and contexts that grow (AppendContext).

The tiny model checks the mechanics (chunk positions across documents, passages naming their
context, appends equal to whole compressions, races, refusals) on the memory store and on a real
redis-server; the real default model checks that a fact in one document of three is answered
from it, and that two facts in two documents are both answered.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_model import TINY_TREE

from sharedllm.common.config import Limits
from sharedllm.common.data.demo import demo_text
from sharedllm.common.engine.append import plan_append
from sharedllm.common.engine.documents import JoinedContexts
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.evidence import EXCERPTS_HEADER_SEVERAL
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.errors import ContextNotFound, IncompatibleContext, InvalidInput, StoreUnavailable
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import MemoryStore, open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["river", "stone", "lantern", "harbor", "meadow", "copper", "violet", "orchard", "falcon", "ember"]
QUOTE = SamplingParams(max_new_tokens=24)


def prose(seed: int, sentences: int) -> str:
    """Plain sentences of common words (the tiny tokenizer splits them at spaces)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sentences):
        picks = torch.randint(len(WORDS), (6,), generator=g).tolist()
        out.append("The " + " ".join(WORDS[i] for i in picks) + ".")
    return " ".join(out)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter) -> Engine:
    return Engine.load(str(tiny_model_dir), adapter=tiny_adapter, device="cpu", limits=Limits(max_document_tokens=4096))


def runtime_on(engine: Engine, store) -> ContextRuntime:
    return ContextRuntime(engine, store, decoded_cache_bytes=0)


# ---- several documents ---------------------------------------------------------------


def test_joined_contexts_number_chunks_in_order_and_fetch_each_documents_own_nodes(engine):
    store = MemoryStore()
    runtime = runtime_on(engine, store)
    ids = [runtime.compress_text(prose(s, 20 + 10 * s), context_id=f"doc-{s}").context_id for s in range(3)]
    parts = [store.open(c, runtime.fingerprints) for c in ids]
    joined = JoinedContexts(parts, ids)
    assert joined.chunk_lengths == sum((p.chunk_lengths for p in parts), ())
    assert torch.equal(joined.token_ids, torch.cat([p.token_ids for p in parts]))
    selection = torch.zeros(len(joined.chunk_lengths), 3, dtype=torch.long)
    selection[:, 1], selection[:, 2] = 3, 5
    nodes = joined.fetch(selection)
    assert nodes.chunk_of_row.tolist() == [c for c in range(len(joined.chunk_lengths)) for _ in range(3)]
    at = 0
    for part in parts:  # each document's rows are its own nodes, read from its own context
        own = part.fetch(selection[: len(part.chunk_lengths)])
        rows = own.keys.shape[1]
        assert torch.equal(nodes.keys[:, at : at + rows], own.keys)
        at += rows
    injection, _ = engine.decoder.prepare(joined, None)
    assert injection.n_chunks == len(joined.chunk_lengths)  # the question sits after every document's chunks


def test_passages_name_their_context_and_the_window_names_each_document(engine):
    runtime = runtime_on(engine, MemoryStore())
    texts = [prose(1, 30), prose(2, 30) + " The zebra code is 4417.", prose(3, 30)]
    ids = [runtime.compress_text(t, context_id=f"report-{i}").context_id for i, t in enumerate(texts)]
    source = runtime._open(tuple(ids), "default")
    plan = engine.plan(source, "What is the zebra code?", max_new_tokens=16, evidence=runtime.evidence)
    window = engine.tokenizer.decode(plan.prompt_ids)
    assert EXCERPTS_HEADER_SEVERAL in window and "Document 2 (report-1):" in window
    finished = run_to_end(runtime.generate(ids, "What is the zebra code?", QUOTE))
    assert "4417" in finished.text  # quoted from the second document's sentence
    assert {p.context_id for p in finished.evidence} <= set(ids)
    best = max(finished.evidence, key=lambda p: p.score)
    assert best.context_id == "report-1" and "4417" in texts[1][best.char_start : best.char_end]
    for p in finished.evidence:  # offsets are their own document's
        assert texts[ids.index(p.context_id)][p.char_start : p.char_end] == p.text
    assert finished.citations and all(
        texts[ids.index(c.context_id)][c.char_start : c.char_end] == c.text for c in finished.citations
    )
    assert finished.context.chunks == sum(len(engine.compressor.chunk(engine.tokenize_document(t))) for t in texts)


def test_lists_past_the_limits_unknown_ids_and_mixed_models_change_nothing(engine, tiny_model_dir):
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    runtime = ContextRuntime(engine, store, default_ttl_s=100, decoded_cache_bytes=0)
    a = runtime.compress_text(prose(4, 20), context_id="a").context_id
    b = runtime.compress_text(prose(5, 20), context_id="b").context_id
    other = Engine.load(str(tiny_model_dir), device="cpu", tree_config=TINY_TREE)  # another (untrained) adapter
    ContextRuntime(other, store, default_ttl_s=100).compress_text(prose(6, 20), context_id="foreign")
    now[0] = 60.0

    def refused(ids, error, match):
        with pytest.raises(error, match=match):
            run_to_end(runtime.generate(ids, "What?", QUOTE))

    refused([a, "nope"], ContextNotFound, "nope")
    refused([a, "foreign"], IncompatibleContext, "context 'foreign' was built for model")
    refused([a, b, a], InvalidInput, "more than once")
    refused([a] * 65, InvalidInput, "at most 64")
    big = runtime.compress_text(prose(7, 450), context_id="big").context_id  # ~3.6K tokens of the 4K limit
    refused([a, b, big], InvalidInput, "tokens together; one question reads at most 4096")
    # Nothing was used: a and b still expire 100 s after they were stored, not after the refusals.
    assert store.info(a).expires_in_s == pytest.approx(40.0)
    assert store.info(b).expires_in_s == pytest.approx(40.0)


# ---- growing contexts ------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
@pytest.mark.parametrize("cut", [0.31, 0.5, 0.77])
def test_an_append_equals_compressing_the_whole_text(engine, redis_server, tenant, store_kind, cut):
    store = MemoryStore() if store_kind == "memory" else open_store(redis_server.url)
    runtime = runtime_on(engine, store)
    text = prose(8, 120)
    at = text.index(" ", int(cut * len(text)))  # the addition starts at a word boundary (" word ...")
    whole = runtime.compress_text(text, context_id="whole", tenant=tenant)
    runtime.compress_text(text[:at], context_id="grown", tenant=tenant)
    appended = runtime.append_text("grown", text[at:], tenant=tenant)
    assert appended.context.n_tokens == whole.n_tokens and appended.context.chunks == whole.chunks
    assert appended.kept_chunks >= 1 and appended.kept_chunks + appended.encoded_chunks == whole.chunks
    assert appended.bytes_written < store.info("whole", tenant=tenant).stored_bytes
    a = store.open("whole", runtime.fingerprints, tenant=tenant)
    b = store.open("grown", runtime.fingerprints, tenant=tenant)
    assert torch.equal(a.token_ids, b.token_ids) and a.chunk_lengths == b.chunk_lengths
    assert torch.allclose(a.retrieval_keys, b.retrieval_keys, atol=1e-5)
    n = a.config.nodes_per_chunk
    every = torch.arange(n).expand(len(a.chunk_lengths), n)
    a_nodes, b_nodes = a.fetch(every), b.fetch(every)
    assert torch.equal(a_nodes.counts, b_nodes.counts)
    assert torch.allclose(a_nodes.keys, b_nodes.keys, atol=1e-5)
    assert torch.allclose(a_nodes.values, b_nodes.values, atol=1e-5)
    assert b.manifest.source_sha256 == a.manifest.source_sha256  # its own source hash: the whole text's
    question = "Where is the lantern?"
    free = SamplingParams(max_new_tokens=8, grounding="off")
    assert (
        run_to_end(runtime.generate("whole", question, free, tenant=tenant)).text
        == run_to_end(runtime.generate("grown", question, free, tenant=tenant)).text
    )


def test_appends_keep_lifetime_usage_and_older_readers_intact(engine, redis_server, tenant):
    store = open_store(redis_server.url)
    runtime = runtime_on(engine, store)
    runtime.compress_text(prose(9, 30), context_id="log", tenant=tenant, pin=True)
    reader = store.open("log", runtime.fingerprints, tenant=tenant)  # a question in flight on the old version
    before = reader.chunk_lengths
    for i in range(3):
        runtime.append_text("log", " " + prose(10 + i, 12), tenant=tenant)
    info = store.info("log", tenant=tenant)
    assert info.expires_in_s is None  # pinned before, pinned after
    assert store.usage(tenant).stored_bytes == info.stored_bytes and store.usage(tenant).contexts == 1
    n = reader.config.nodes_per_chunk
    old = reader.fetch(torch.arange(n).expand(len(before), n))  # the old version stays readable, whole
    assert old.keys.shape[1] == len(before) * n
    assert store.delete("log", tenant=tenant)
    with pytest.raises(ContextNotFound):
        store.info("log", tenant=tenant)
    # Every part of every version is gone with the delete (kept chunks of older generations too).
    assert not list(store._redis.scan_iter(match=f"sllm:{{{tenant}:log}}*"))


@pytest.mark.parametrize("store_kind", ["memory", "redis"])
def test_concurrent_appends_both_land(engine, redis_server, tenant, store_kind):
    store = MemoryStore() if store_kind == "memory" else open_store(redis_server.url)
    runtime = runtime_on(engine, store)
    runtime.compress_text(prose(11, 30), context_id="shared", tenant=tenant)
    additions = [" Alpha " + prose(12, 15), " Omega " + prose(13, 15)]
    errors: list[BaseException] = []

    def append(text: str) -> None:
        try:
            runtime.append_text("shared", text, tenant=tenant)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(t,)) for t in additions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    source = store.open("shared", runtime.fingerprints, tenant=tenant)
    text = engine.tokenizer.decode(source.token_ids.tolist())
    assert all(a.strip() in text for a in additions)  # both landed, whole, one after the other


def test_bad_appends_are_refused_and_change_nothing(engine):
    store = MemoryStore()
    runtime = runtime_on(engine, store)
    named_by_content = runtime.compress_text(prose(14, 20)).context_id
    with pytest.raises(InvalidInput, match="named by its document's content"):
        runtime.append_text(named_by_content, " More.")
    runtime.compress_text(prose(15, 20), context_id="mine")
    before = store.info("mine").manifest
    with pytest.raises(ContextNotFound):
        runtime.append_text("absent", " More.")
    with pytest.raises(InvalidInput, match="nothing to append"):
        runtime.append_text("mine", "")
    with pytest.raises(InvalidInput, match="limit is 4096"):
        runtime.append_text("mine", " " + prose(16, 600))
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        runtime.append_ids("mine", [10**7])
    assert store.info("mine").manifest == before
    grown = runtime.append_ids("mine", engine.tokenizer(" More words.", add_special_tokens=False)["input_ids"])
    assert grown.context.n_tokens == before.n_tokens + 3


# ---- the real model ------------------------------------------------------------------


def test_the_real_model_answers_across_three_documents():
    """A fact only in the third document is answered from it; two facts in two documents, both."""
    books = ["first", "second", "third"]
    demo = demo_text()
    texts = [demo[i * 9000 : i * 9000 + 6000] for i in range(3)]  # about 1.5K tokens each
    texts = [t[: t.rindex("\n")] for t in texts]  # whole lines

    def plant(text: str, at: int, fact: str) -> str:
        line_end = text.index("\n", at) + 1
        return text[:line_end] + fact + "\n" + text[line_end:]

    texts[2] = plant(texts[2], 3000, "The door code of the Sapphire Archive is 4817.")
    texts[1] = plant(texts[1], 2000, "The harbour master of Port Wren is Ingrid Fallow.")
    runtime = ContextRuntime(Engine.load(device="cpu"), open_store("memory://"), decoded_cache_bytes=0)
    ids = [runtime.compress_text(t, context_id=book).context_id for t, book in zip(texts, books, strict=True)]
    one = run_to_end(runtime.generate(ids, "What is the door code of the Sapphire Archive?", QUOTE))
    assert "4817" in one.text
    assert any(p.context_id == "third" and "4817" in p.text for p in one.evidence)
    both = run_to_end(
        runtime.generate(
            ids,
            "What is the door code of the Sapphire Archive, and who is the harbour master of Port Wren?",
            SamplingParams(max_new_tokens=64),
        )
    )
    assert "4817" in both.text and "Ingrid Fallow" in both.text
    assert {c.context_id for c in both.citations} >= {"third", "second"}


# ---- over gRPC -----------------------------------------------------------------------


def test_several_contexts_and_appends_over_grpc(tiny_model_dir, tiny_adapter, redis_server, engine):
    import grpc
    from grpc_stack import SERVING, EventLoopThread, InProcessServer, server_config, wait_for_health

    from sharedllm.common.generated.sharedllm.v1 import compressor_pb2 as cpb
    from sharedllm.common.generated.sharedllm.v1 import compressor_pb2_grpc, decoder_pb2_grpc
    from sharedllm.common.generated.sharedllm.v1 import decoder_pb2 as dpb
    from sharedllm.common.rpc.client import CompressorClient, DecoderClient, RemoteError
    from sharedllm.compressor_service.server import SPEC as COMPRESSOR
    from sharedllm.decoder_service.server import SPEC as DECODER

    config = server_config(
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", redis_server.url,
        "--max-document-tokens", "4096",
    )  # fmt: skip
    loop = EventLoopThread()
    try:
        with InProcessServer(loop, COMPRESSOR, config) as c, InProcessServer(loop, DECODER, config) as d:
            for server in (c, d):
                wait_for_health(server.target, SERVING)
            compressor, decoder = CompressorClient(c.target), DecoderClient(d.target)
            texts = [prose(21, 25), prose(22, 25) + " The zebra code is 4417.", prose(23, 25)]
            ids = [compressor.compress(t.encode(), context_id=f"grpc-{i}").context_id for i, t in enumerate(texts)]
            remote = run_to_end(decoder.generate(ids, "What is the zebra code?", QUOTE))
            local = run_to_end(
                runtime_on(engine, open_store(redis_server.url)).generate(ids, "What is the zebra code?", QUOTE)
            )
            assert remote.text == local.text and "4417" in remote.text
            assert [p.context_id for p in remote.evidence] == [p.context_id for p in local.evidence]
            assert [(p.char_start, p.char_end) for p in remote.evidence] == [
                (p.char_start, p.char_end) for p in local.evidence
            ]
            assert remote.citations and all(c.context_id == "grpc-1" for c in remote.citations)

            grown = compressor.append("grpc-0", b" The lantern stands by the river.")
            assert grown.context.context_id == "grpc-0" and grown.encoded_chunks >= 1 and grown.bytes_written > 0
            assert grown.context.n_tokens == len(
                engine.tokenize_document(texts[0] + " The lantern stands by the river.")
            )
            after = run_to_end(decoder.generate(["grpc-0", "grpc-2"], "Where does the lantern stand?", QUOTE))
            assert "lantern stands by the river" in after.text and after.evidence[0].context_id == "grpc-0"

            with grpc.insecure_channel(d.target) as channel, grpc.insecure_channel(c.target) as cchannel:
                generate = decoder_pb2_grpc.DecoderServiceStub(channel).Generate
                append = compressor_pb2_grpc.CompressorServiceStub(cchannel).AppendContext

                def status(call) -> grpc.StatusCode:
                    try:
                        call()
                    except grpc.RpcError as exc:
                        return exc.code()
                    return grpc.StatusCode.OK

                def ask(**fields):
                    return lambda: list(generate(dpb.GenerateRequest(prompt="What?", **fields)))

                assert (
                    status(ask(context_id="grpc-0", context_ids=["grpc-1", "grpc-2"]))
                    == grpc.StatusCode.INVALID_ARGUMENT
                )
                assert status(ask(context_ids=["grpc-0", "absent"])) == grpc.StatusCode.NOT_FOUND
                assert status(ask(context_ids=["grpc-0", "grpc-0"])) == grpc.StatusCode.INVALID_ARGUMENT
                assert status(ask(context_ids=["grpc-0"] * 65)) == grpc.StatusCode.INVALID_ARGUMENT
                pieces = [cpb.AppendContextRequest(context_id="absent"), cpb.AppendContextRequest(text=b" More.")]
                assert status(lambda: append(iter(pieces))) == grpc.StatusCode.NOT_FOUND
                assert status(lambda: append(iter([]))) == grpc.StatusCode.INVALID_ARGUMENT
                named = compressor.compress(b"A text named by its own content.").context_id
                with pytest.raises(RemoteError, match=r"INVALID_ARGUMENT.*named by its document's content"):
                    compressor.append(named, b" More.")
                info = decoder.server_info()
                assert info.limits.max_contexts_per_question == 64
            compressor.close()
            decoder.close()
    finally:
        loop.close()


@pytest.mark.parametrize("sentences", [3, 40])  # one partial chunk (nothing kept), and several chunks
def test_a_failed_append_puts_the_version_it_extended_back(engine, redis_server, tenant, sentences):
    """A write Redis cannot get to the replicas asked for is undone; for an append that means the
    version it extended is current again, whole, and still counted in the tenant's usage."""
    runtime = runtime_on(engine, open_store(redis_server.url))
    runtime.compress_text(prose(30, sentences), context_id="kept", tenant=tenant)
    before = runtime.store.info("kept", tenant=tenant)
    lonely = runtime_on(engine, open_store(redis_server.url, min_replicas=1, replica_timeout_s=0.2))
    with pytest.raises(StoreUnavailable, match="replicas"):
        lonely.append_text("kept", " The lantern is lit.", tenant=tenant)
    after = runtime.store.info("kept", tenant=tenant)
    assert after.manifest == before.manifest and after.stored_bytes == before.stored_bytes
    assert runtime.store.usage(tenant).stored_bytes == before.stored_bytes
    source = runtime.store.open("kept", runtime.fingerprints, tenant=tenant)
    n = source.config.nodes_per_chunk
    assert source.fetch(torch.arange(n).expand(len(source.chunk_lengths), n)).keys.shape[1] == n * len(
        source.chunk_lengths
    )


def test_stored_ids_no_tokenizer_would_give_are_kept_as_they_are(engine):
    """Token ids sent by a client need not be what the tokenizer makes of their text; an append
    after them neither re-tokenizes nor recompresses what came before."""
    tokenizer = engine.tokenizer
    letters = [i for ch in prose(31, 30) for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    chunk = TINY_TREE.chunk_size
    lengths = [min(chunk, len(letters) - s) for s in range(0, len(letters), chunk)]
    plan = plan_append(letters, lengths, chunk, tokenizer, text=" The end.")
    last = sum(lengths[:-1])
    assert plan.kept_chunks == len(lengths) - 1 and plan.kept_tokens == last
    assert plan.tail_ids[: len(letters) - last] == letters[last:]  # the stored tail as stored
