"""The gRPC services end to end: real servers on loopback, a real redis-server, real clients.

The tiny random model serves the status-code table, cancellation, deadlines, the concurrency
limit, health and SIGTERM; one test on the real default model checks that Compress then
Generate over gRPC and Redis streams exactly what embedded mode produces.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_stack import (
    NOT_SERVING,
    SERVING,
    EventLoopThread,
    InProcessServer,
    health,
    server_config,
    status_of,
    wait_for_health,
    wait_until,
)
from redis_server import free_port
from tiny_model import TINY_TREE

from sharedllm.cli.server_options import ServerArguments
from sharedllm.common.config import TreeConfig
from sharedllm.common.engine.adapter import InjectionAdapter
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import Finished, TokenDelta
from sharedllm.common.errors import ResourceExhausted
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2 as cpb
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2_grpc, decoder_pb2_grpc
from sharedllm.common.generated.sharedllm.v1 import decoder_pb2 as dpb
from sharedllm.common.rpc.client import CompressorClient, DecoderClient, RemoteError
from sharedllm.common.rpc.config import ServerConfig
from sharedllm.common.rpc.server import load_runtime
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import DEFAULT_TENANT, open_store
from sharedllm.compressor_service.server import SPEC as COMPRESSOR
from sharedllm.decoder_service.server import SPEC as DECODER

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef"}
QUESTION = "Where is the cat?"
DOCUMENT = "The cat sat on the mat. The dog lay by the door. " * 40  # about 550 tokens, 9 chunks
LONG_ANSWER = 900  # tokens; the tiny model never stops early on LONG_PROMPT (greedy), so cut short means stopped
LONG_PROMPT = "Tell me a story"
MAX_DOCUMENT_TOKENS = 4096
MAX_DOCUMENT_BYTES = 128 << 10
MAX_MESSAGE_BYTES = 256 << 10


def long_request(context_id: str, max_new_tokens: int = LONG_ANSWER) -> dpb.GenerateRequest:
    """A request the tiny model answers to its token cap: free generation, no sentence limit, no loop guard."""
    return dpb.GenerateRequest(
        context_id=context_id,
        prompt=LONG_PROMPT,
        max_new_tokens=max_new_tokens,
        grounding=dpb.GROUNDING_OFF,
        max_sentences=0,
        loop_guard=0,
    )


def auth(tenant: str | None = "alice", key: str | None = None) -> list[tuple[str, str]]:
    key = key if key is not None else KEYS.get(tenant or "")
    return [("authorization", f"Bearer {key}")] if key else []


@pytest.fixture(scope="module")
def loop():
    thread = EventLoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir, tiny_adapter) -> Engine:
    """The tiny model as the servers load it, for contexts made (or compared) on the test's side."""
    return Engine.load(model=str(tiny_model_dir), adapter=tiny_adapter)


@dataclass
class Stack:
    compressor: compressor_pb2_grpc.CompressorServiceStub
    decoder: decoder_pb2_grpc.DecoderServiceStub
    compressor_target: str
    decoder_target: str

    def compress(self, text: str = DOCUMENT, tenant: str = "alice", **options) -> str:
        request = cpb.CompressRequest(text=text.encode(), options=cpb.CompressOptions(**options))
        return self.compressor.Compress(request, metadata=auth(tenant)).context.context_id

    def generate(self, context_id: str, prompt: str = QUESTION, tenant: str = "alice", **fields):
        request = dpb.GenerateRequest(context_id=context_id, prompt=prompt, **fields)
        return list(self.decoder.Generate(request, metadata=auth(tenant)))

    def stats(self) -> dpb.ServerStats:
        return self.decoder.GetServerInfo(dpb.GetServerInfoRequest(), metadata=auth()).stats


@pytest.fixture(scope="module")
def stack(loop, tiny_model_dir, tiny_adapter, redis_server, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text("# tenant key\n" + "".join(f"{t} {k}\n" for t, k in KEYS.items()))
    config = server_config(
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter),
        "--store-url", redis_server.url,
        "--api-keys-file", str(keys_file),
        "--max-document-tokens", str(MAX_DOCUMENT_TOKENS),
        "--max-document-bytes", str(MAX_DOCUMENT_BYTES),
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--max-concurrent", "2",
        "--max-queued", "1",
        "--queue-timeout-s", "2",
        "--health-interval-s", "0.2",
    )  # fmt: skip
    with InProcessServer(loop, COMPRESSOR, config) as compressor, InProcessServer(loop, DECODER, config) as decoder:
        for server in (compressor, decoder):
            wait_for_health(server.target, SERVING)
        with grpc.insecure_channel(compressor.target) as c, grpc.insecure_channel(decoder.target) as d:
            yield Stack(
                compressor_pb2_grpc.CompressorServiceStub(c),
                decoder_pb2_grpc.DecoderServiceStub(d),
                compressor.target,
                decoder.target,
            )


def text_and_ids(responses) -> tuple[str, list[int]]:
    return "".join(r.text for r in responses), [i for r in responses for i in r.token_ids]


def embedded_answer(
    runtime: ContextRuntime, context_id: str | None, prompt: str, params: SamplingParams, tenant: str = DEFAULT_TENANT
):
    """Text, token ids and Finished of embedded mode (the same runtime the services call)."""
    events = list(runtime.generate(context_id, prompt, params, tenant=tenant))
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    finished = next(e for e in events if isinstance(e, Finished))
    return "".join(d.text for d in deltas), [d.token_id for d in deltas if d.token_id is not None], finished


def test_flags_fall_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("SHAREDLLM_STORE_URL", "memory://")
    monkeypatch.setenv("SHAREDLLM_MAX_CONCURRENT", "7")
    monkeypatch.setenv("SHAREDLLM_MAX_DOCUMENT_TOKENS", "4096")
    arguments = ServerArguments(default_port=1234)
    parser = argparse.ArgumentParser()
    arguments.add_arguments(parser)
    config = arguments.from_args(parser.parse_args(["--max-concurrent", "3"]))
    assert (config.store.url, config.network.max_concurrent, config.model.max_document_tokens, config.network.port) == (
        "memory://",
        3,  # a flag wins over the environment
        4096,
        1234,
    )
    monkeypatch.setenv("SHAREDLLM_MAX_CONCURRENT", "many")
    with pytest.raises(SystemExit):
        ServerArguments(default_port=1).add_arguments(argparse.ArgumentParser())


def test_compress_manage_and_generate_like_embedded(stack, tiny_engine, redis_server):
    # The same document as one message and as a stream cut inside a multi-byte character.
    text = "Ünïcödé " + DOCUMENT
    data = text.encode()
    unary = stack.compressor.Compress(cpb.CompressRequest(text=data), metadata=auth()).context
    pieces = [cpb.CompressStreamRequest(options=cpb.CompressOptions(context_id="streamed-doc"))]
    cuts = [0, 1, *range(1001, len(data), 1001), len(data)]  # the first cut splits "Ü" in two
    pieces += [cpb.CompressStreamRequest(text=data[a:b]) for a, b in itertools.pairwise(cuts)]
    with pytest.raises(UnicodeDecodeError):
        data[:1].decode()
    streamed = stack.compressor.CompressStream(iter(pieces), metadata=auth()).context
    assert streamed.context_id == "streamed-doc"
    assert streamed.document_tokens == unary.document_tokens > 500
    assert streamed.chunks == math.ceil(unary.document_tokens / TINY_TREE.chunk_size)
    assert unary.stored_bytes > 0 and unary.compression_ratio > 1 and unary.timings.total_seconds > 0

    info = stack.compressor.GetContext(cpb.GetContextRequest(context_id=unary.context_id), metadata=auth())
    assert info.compatible and info.document_tokens == unary.document_tokens
    assert [(lv.level, lv.nodes) for lv in info.levels] == [(1, 2 * unary.chunks), (2, 4 * unary.chunks)]
    assert info.HasField("expires_in_seconds") and 0 < info.expires_in_seconds <= 24 * 3600
    touched = stack.compressor.TouchContext(
        cpb.TouchContextRequest(context_id=unary.context_id, pin=True), metadata=auth()
    )
    assert not touched.HasField("expires_in_seconds")

    # Same seed, same answer as embedded mode reading the same stored context.
    embedded = ContextRuntime(tiny_engine, open_store(redis_server.url))
    params = {"max_new_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    responses = stack.generate(unary.context_id, **params)
    answer, ids = text_and_ids(responses)
    expected_text, expected_ids, finished = embedded_answer(
        embedded, unary.context_id, QUESTION, SamplingParams(**params), tenant="alice"
    )
    assert (answer, ids) == (expected_text, expected_ids) and len(ids) > 0
    without_context = embedded_answer(embedded, None, QUESTION, SamplingParams(**params))
    assert without_context[1] != ids  # the context shapes the answer, so equal answers mean the same nodes
    last = responses[-1]
    assert finished.reason == "length" and last.finish_reason == dpb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == len(ids) and last.usage.context_chunks == unary.chunks
    assert 0 < last.usage.context_bytes_read < unary.stored_bytes  # only the selected nodes were read
    assert last.timings.time_to_first_token_seconds > 0 and last.timings.prefill_seconds > 0
    assert last.usage.context_nodes_cached == 0

    # The same question again: every selected node comes from the decoder's cache, same answer.
    before = stack.decoder.GetServerInfo(dpb.GetServerInfoRequest(), metadata=auth()).stats
    again = stack.generate(unary.context_id, **params)
    assert text_and_ids(again) == (answer, ids)
    usage = again[-1].usage
    assert usage.context_nodes_cached > 0 and usage.context_bytes_read < last.usage.context_bytes_read
    after = stack.decoder.GetServerInfo(dpb.GetServerInfoRequest(), metadata=auth()).stats
    assert after.decoded_cache_hits - before.decoded_cache_hits == usage.context_nodes_cached + 1  # + the keys
    assert 0 < after.decoded_cache_bytes <= after.decoded_cache_capacity_bytes

    # The window held excerpts of the document; the last message says which, where they are, and
    # they are the document's own text. Without evidence the window holds the question alone.
    passages = last.evidence
    assert passages and last.usage.evidence_tokens == sum(p.token_end - p.token_start for p in passages)
    assert [p.token_start for p in passages] == sorted(p.token_start for p in passages)
    assert all(text[p.char_start : p.char_end] == p.text for p in passages)
    assert last.timings.evidence_seconds > 0
    assert [(x.token_start, x.text) for x in finished.evidence] == [(p.token_start, p.text) for p in passages]
    bare = stack.generate(unary.context_id, evidence_tokens=0, **params)
    assert not bare[-1].evidence and bare[-1].usage.evidence_tokens == 0
    assert bare[-1].usage.prompt_tokens < last.usage.prompt_tokens
    spread = stack.generate(unary.context_id, evidence_tokens=64, evidence_mode="spread", **params)
    assert 0 < spread[-1].usage.evidence_tokens <= 64

    stack.compressor.DeleteContext(cpb.DeleteContextRequest(context_id="streamed-doc"), metadata=auth())
    server = stack.decoder.GetServerInfo(dpb.GetServerInfoRequest(), metadata=auth())
    assert server.adapter_fingerprint == embedded.fingerprints.adapter
    assert server.tree_config.chunk_size == 64 and server.limits.max_document_tokens == MAX_DOCUMENT_TOKENS
    assert server.limits.window_tokens == 1024 and server.limits.max_concurrent_requests == 2

    with grpc.insecure_channel(stack.decoder_target) as channel:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"sharedllm.v1.DecoderService", "grpc.health.v1.Health"} <= names


def test_grounding_and_citations_travel_over_grpc(stack, tiny_engine, redis_server):
    """The request's grounding, sentence limit and loop guard reach the engine (each answer equals
    embedded mode's with the same parameters), and the citations come back with their offsets."""
    # One sentence that alone answers the question, among many alike: the default answer quotes it.
    answer_sentence = "The lighthouse keeper hid the brass key under the red stone."
    document = DOCUMENT + answer_sentence + " " + DOCUMENT
    context_id = stack.compress(document)
    question = "Where did the lighthouse keeper hide the brass key?"
    embedded = ContextRuntime(tiny_engine, open_store(redis_server.url))
    free = {"grounding": dpb.GROUNDING_OFF, "max_sentences": 0, "loop_guard": 0}
    cases = [
        ({}, SamplingParams(max_new_tokens=24)),
        (
            {"grounding": dpb.GROUNDING_FACTS, "max_sentences": 2},
            SamplingParams(max_new_tokens=24, grounding="facts", max_sentences=2),
        ),
        (free, SamplingParams(max_new_tokens=24, grounding="off", max_sentences=0, loop_guard=0)),
    ]
    answers, lasts = [], []
    for fields, params in cases:
        responses = stack.generate(context_id, question, max_new_tokens=24, **fields)
        expected_text, expected_ids, finished = embedded_answer(embedded, context_id, question, params, "alice")
        assert text_and_ids(responses) == (expected_text, expected_ids)
        last = responses[-1]
        assert [(c.answer_start, c.char_start, c.text) for c in last.citations] == [
            (c.answer_start, c.char_start, c.text) for c in finished.citations
        ]
        for c in last.citations:
            assert document[c.char_start : c.char_end] == c.text
            assert not c.HasField("evidence_index") or last.evidence[c.evidence_index].char_start <= c.char_start
        answers.append(expected_text)
        lasts.append(last)
    assert answers[0] == answer_sentence
    assert [(c.answer_start, c.answer_end, c.text) for c in lasts[0].citations] == [
        (0, len(answer_sentence) - 1, answer_sentence[:-1])  # a run of whole words: the period is not one
    ]
    code = grpc.StatusCode
    for fields in ({"grounding": 7}, {"max_sentences": -1}, {"loop_guard": 5000}):
        assert status_of(lambda f=fields: stack.generate(context_id, **f)) == code.INVALID_ARGUMENT


def test_the_typed_client_gets_what_the_wire_carries(stack, tiny_engine):
    """CompressorClient and DecoderClient: the runtime's results, equal to the raw messages; a
    failed call is a RemoteError with the status code."""
    options = {"api_key": KEYS["alice"], "timeout_s": 60}
    with CompressorClient(stack.compressor_target, **options) as compressor:
        outcome = compressor.compress(DOCUMENT.encode())
        by_ids = compressor.compress(tiny_engine.tokenize_document(DOCUMENT), context_id="typed-by-ids", pin=True)
        assert (by_ids.n_tokens, by_ids.chunks) == (outcome.n_tokens, outcome.chunks) and by_ids.n_tokens > 500
        stored = compressor.context("typed-by-ids")
        assert stored.compatible and stored.n_tokens == outcome.n_tokens and stored.expires_in_s is None
        compressor.delete("typed-by-ids")
        with pytest.raises(RemoteError) as missing:
            compressor.context("typed-by-ids")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND and not missing.value.transient
    with DecoderClient(stack.decoder_target, **options) as decoder:
        params = SamplingParams(max_new_tokens=8, grounding="off")
        got = list(decoder.generate(outcome.context_id, QUESTION, params))
        raw = stack.generate(outcome.context_id, max_new_tokens=8, grounding=dpb.GROUNDING_OFF)
        finished = got[-1]
        assert isinstance(finished, Finished) and all(isinstance(e, TokenDelta) for e in got[:-1])
        assert (finished.text, [e.token_id for e in got[:-1] if e.token_id is not None]) == text_and_ids(raw)
        assert finished.completion_tokens == raw[-1].usage.completion_tokens == 8 and finished.reason == "length"
        assert finished.context.chunks == outcome.chunks
        with pytest.raises(RemoteError) as refused:
            list(DecoderClient(stack.decoder_target, api_key="wrong").generate(outcome.context_id, QUESTION, params))
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_bad_requests_get_their_status_codes(stack, tiny_engine, redis_server):
    code = grpc.StatusCode
    # Four documents: one document compressed twice would be one context (deduplicated).
    ok = stack.compress()
    expired = stack.compress("Expiring. " + DOCUMENT, ttl_seconds=0.2)
    deleted = stack.compress("Deleted. " + DOCUMENT)
    stack.compressor.DeleteContext(cpb.DeleteContextRequest(context_id=deleted), metadata=auth())
    corrupted = stack.compress("Corrupted. " + DOCUMENT)
    with redis_server.client() as client:
        nodes = list(client.scan_iter(match=f"sllm:{{alice:{corrupted}}}:*:node:*"))
        assert nodes
        for key in nodes:
            client.set(key, b"not a safetensors payload", keepttl=True)
    other_adapter = (
        ContextRuntime(
            Engine(tiny_engine.loaded, InjectionAdapter.initialise(tiny_engine.body, TreeConfig(2, 64, 2, 2))),
            open_store(redis_server.url),
        )
        .compress_text(DOCUMENT, tenant="alice")
        .context_id
    )
    time.sleep(0.4)  # `expired` is gone by now

    def compress(tenant: str | None = "alice", key: str | None = None, **fields) -> Callable[[], object]:
        return lambda: stack.compressor.Compress(cpb.CompressRequest(**fields), metadata=auth(tenant, key))

    def stream(*messages: cpb.CompressStreamRequest) -> Callable[[], object]:
        return lambda: stack.compressor.CompressStream(iter(messages), metadata=auth())

    def generate(context_id: str = ok, tenant: str | None = "alice", key: str | None = None, **fields):
        request = dpb.GenerateRequest(context_id=context_id, prompt=fields.pop("prompt", "Where?"), **fields)
        return lambda: list(stack.decoder.Generate(request, metadata=auth(tenant, key)))

    def manage(rpc: str, context_id: str, tenant: str = "alice") -> Callable[[], object]:
        request = getattr(cpb, f"{rpc}Request")(context_id=context_id)
        return lambda: getattr(stack.compressor, rpc)(request, metadata=auth(tenant))

    text, options, invalid = cpb.CompressStreamRequest, cpb.CompressOptions, code.INVALID_ARGUMENT
    table: list[tuple[str, Callable[[], object], grpc.StatusCode]] = [
        ("no document", compress(), invalid),
        ("empty document", compress(text=b""), invalid),
        ("blank document", compress(text=b" \n\t "), invalid),
        ("binary document (NUL)", compress(text=b"abc\x00def"), invalid),
        ("invalid UTF-8", compress(text=b"caf\xc3 \xff\xfe"), invalid),
        ("too many tokens (text)", compress(text=b"The cat sat. " * 2000), invalid),
        ("too many tokens (ids)", compress(token_ids=cpb.TokenIds(ids=[42] * 5000)), invalid),
        ("token id outside vocabulary", compress(token_ids=cpb.TokenIds(ids=[1, 10**9])), invalid),
        ("message over the size limit", compress(text=b"a" * (MAX_MESSAGE_BYTES + 1)), code.RESOURCE_EXHAUSTED),
        ("stream over the byte limit", stream(*[text(text=b"b " * 25_000)] * 3), invalid),
        ("stream mixing text and ids", stream(text(text=b"x"), text(token_ids=cpb.TokenIds(ids=[1]))), invalid),
        ("options after the first piece", stream(text(text=b"x"), text(options=options(pin=True))), invalid),
        ("empty stream", stream(), invalid),
        ("bad context id", compress(text=b"hi", options=options(context_id="../etc")), invalid),
        ("negative ttl", compress(text=b"hi", options=options(ttl_seconds=-1)), invalid),
        ("NaN ttl", compress(text=b"hi", options=options(ttl_seconds=math.nan)), invalid),
        ("ttl and pin", compress(text=b"hi", options=options(ttl_seconds=5, pin=True)), invalid),
        ("compress without API key", compress(text=b"hi", tenant=None), code.UNAUTHENTICATED),
        ("compress with a wrong API key", compress(text=b"hi", key="not-a-key-0123456789"), code.UNAUTHENTICATED),
        ("generate without API key", generate(tenant=None), code.UNAUTHENTICATED),
        ("generate with a wrong API key", generate(key="not-a-key-0123456789"), code.UNAUTHENTICATED),
        ("unknown context", generate("no-such-context"), code.NOT_FOUND),
        ("empty context id", generate(""), invalid),
        ("expired context", generate(expired), code.NOT_FOUND),
        ("deleted context", generate(deleted), code.NOT_FOUND),
        ("deleting twice", manage("DeleteContext", deleted), code.NOT_FOUND),
        ("another tenant's context", generate(ok, tenant="bob"), code.NOT_FOUND),
        ("another tenant's metadata", manage("GetContext", ok, tenant="bob"), code.NOT_FOUND),
        ("deleting another tenant's context", manage("DeleteContext", ok, tenant="bob"), code.NOT_FOUND),
        ("touching another tenant's context", manage("TouchContext", ok, tenant="bob"), code.NOT_FOUND),
        ("empty prompt", generate(prompt=" "), invalid),
        ("negative max_new_tokens", generate(max_new_tokens=-1), invalid),
        ("zero max_new_tokens", generate(max_new_tokens=0), invalid),
        ("absurd max_new_tokens", generate(max_new_tokens=10**9), invalid),
        ("prompt + max_new_tokens over the window", generate(max_new_tokens=1020), invalid),
        ("temperature NaN", generate(temperature=math.nan), invalid),
        ("negative temperature", generate(temperature=-0.5), invalid),
        ("top_p zero", generate(top_p=0.0), invalid),
        ("top_p above one", generate(top_p=1.5), invalid),
        ("negative top_k", generate(top_k=-3), invalid),
        ("too many stop strings", generate(stop=[f"s{i}" for i in range(17)]), invalid),
        ("empty stop string", generate(stop=[""]), invalid),
        ("negative evidence_tokens", generate("no-such-context", evidence_tokens=-1), invalid),  # before any read
        ("unknown evidence mode", generate("no-such-context", evidence_mode="everything"), invalid),
        ("context built with another adapter", generate(other_adapter), code.FAILED_PRECONDITION),
        ("corrupted stored node", generate(corrupted), code.DATA_LOSS),
    ]  # fmt: skip
    failures = [(name, got, want) for name, call, want in table if (got := status_of(call)) != want]
    assert not failures, "\n".join(f"{name}: got {got.name}, expected {want.name}" for name, got, want in failures)

    # After the whole table the servers still serve, and bob's calls left alice's context alone.
    answer = stack.generate(ok, max_new_tokens=4)
    assert answer[-1].finish_reason == dpb.FINISH_REASON_LENGTH and answer[-1].usage.completion_tokens == 4
    assert stack.compress(tenant="bob")
    assert stack.stats().active_requests == 0


def test_cancelling_a_stream_stops_decoding(stack):
    context_id = stack.compress()
    before = stack.stats().generated_tokens_total
    request = long_request(context_id)
    call = stack.decoder.Generate(request, metadata=auth())
    for _ in range(3):
        next(call)
    call.cancel()
    wait_until(lambda: stack.stats().active_requests == 0, what="the worker to stop")
    stopped_at = stack.stats().generated_tokens_total
    time.sleep(0.5)
    assert stack.stats().generated_tokens_total == stopped_at  # no longer growing
    assert 3 <= stopped_at - before < LONG_ANSWER // 2


def test_a_short_deadline_gives_deadline_exceeded(stack):
    context_id = stack.compress()
    request = long_request(context_id)
    before = stack.stats().generated_tokens_total
    with pytest.raises(grpc.RpcError) as failure:
        list(stack.decoder.Generate(request, metadata=auth(), timeout=0.5))
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: stack.stats().active_requests == 0, what="the worker to stop")
    assert stack.stats().generated_tokens_total - before < LONG_ANSWER // 2


def test_requests_beyond_the_limit_wait_and_beyond_the_queue_are_refused(stack):
    """Two run (the limit), one waits for a slot (the queue), a fourth is refused at once; the
    waiting one is refused once it has waited queue_timeout_s, or runs when a slot frees."""
    context_id = stack.compress()
    request = long_request(context_id)
    calls = [stack.decoder.Generate(request, metadata=auth()) for _ in range(2)]  # the limit is 2
    for call in calls:
        next(call)
    try:
        with ThreadPoolExecutor(1) as pool:
            started = time.perf_counter()
            waited = pool.submit(status_of, lambda: list(stack.decoder.Generate(request, metadata=auth())))
            wait_until(lambda: stack.stats().queued_requests == 1, what="the call to queue")
            fourth = status_of(lambda: list(stack.decoder.Generate(request, metadata=auth())))
            assert fourth == grpc.StatusCode.RESOURCE_EXHAUSTED  # the queue (1) is full
            assert waited.result(timeout=30) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert 2.0 <= time.perf_counter() - started < 10  # after queue_timeout_s (2 s here)
            queued = pool.submit(lambda: list(stack.decoder.Generate(long_request(context_id, 8), metadata=auth())))
            wait_until(lambda: stack.stats().queued_requests == 1, what="the call to queue")
            calls[0].cancel()  # a slot frees: the waiting call takes it
            answer = queued.result(timeout=60)
            assert answer[-1].finish_reason == dpb.FINISH_REASON_LENGTH
        assert stack.stats().refused_requests_total >= 2
    finally:
        for call in calls:
            call.cancel()
        wait_until(lambda: stack.stats().active_requests == 0, what="the workers to stop")


def test_health_follows_loading_and_redis(loop, tiny_model_dir, tiny_adapter, make_redis_server):
    redis = make_redis_server()
    loading = threading.Event()

    def slow_load(config: ServerConfig, lower_only: bool) -> ContextRuntime:
        loading.wait(60)
        return load_runtime(config, lower_only)

    config = server_config(
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", redis.url,
        "--health-interval-s", "0.1",
    )  # fmt: skip
    with InProcessServer(loop, COMPRESSOR, config, load=slow_load) as server:
        stub = compressor_pb2_grpc.CompressorServiceStub(grpc.insecure_channel(server.target))

        def compress_status() -> grpc.StatusCode:
            return status_of(lambda: stub.Compress(cpb.CompressRequest(text=DOCUMENT.encode())))

        assert health(server.target) == NOT_SERVING  # listening, model not loaded
        assert health(server.target, COMPRESSOR.full_name) == NOT_SERVING
        assert compress_status() == grpc.StatusCode.UNAVAILABLE
        loading.set()
        wait_for_health(server.target, SERVING, service=COMPRESSOR.full_name)
        assert compress_status() == grpc.StatusCode.OK
        redis.stop()
        wait_for_health(server.target, NOT_SERVING, timeout=15)
        assert compress_status() == grpc.StatusCode.UNAVAILABLE
        redis.start()
        wait_for_health(server.target, SERVING, timeout=15)
        assert compress_status() == grpc.StatusCode.OK


def test_sigterm_drains_an_in_flight_stream(tiny_engine, tiny_model_dir, tiny_adapter, redis_server, tmp_path):
    context_id = ContextRuntime(tiny_engine, open_store(redis_server.url)).compress_text(DOCUMENT).context_id
    port = free_port()
    target = f"127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "sharedllm", "serve", "decoder", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", redis_server.url,
        "--torch-threads", "1", "--drain-delay-s", "1", "--health-interval-s", "0.2",
    ]  # fmt: skip
    log = (tmp_path / "decoder.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_health(target, SERVING, timeout=180)
        with grpc.insecure_channel(target) as channel:
            request = long_request(context_id)
            request.max_new_tokens = 300
            call = decoder_pb2_grpc.DecoderServiceStub(channel).Generate(request)
            first = next(call)
            process.send_signal(signal.SIGTERM)
            wait_for_health(target, NOT_SERVING, timeout=5)  # during the drain delay
            rest = list(call)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert rest[-1].finish_reason == dpb.FINISH_REASON_LENGTH, (tmp_path / "decoder.log").read_text()[-3000:]
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 300 == rest[-1].usage.completion_tokens


@pytest.mark.model
def test_real_model_over_grpc_and_redis_matches_embedded(loop, redis_server, tmp_path, capsys):
    from sharedllm.cli import main
    from sharedllm.common.data.demo import demo_document

    # An untrained adapter for the shipped tree, as a file both sides load: the services take
    # adapters as files (or shipped names), never as tree flags.
    engine = Engine.load(adapter=None, tree_config=TreeConfig(chunk_size=512, pool_size=16))
    adapter = tmp_path / "untrained.safetensors"
    engine.adapter.save(adapter, engine.loaded.fingerprint)
    config = server_config("--store-url", redis_server.url, "--adapter", str(adapter))
    path = demo_document(tmp_path)
    embedded = ContextRuntime(engine, open_store("memory://"))
    with InProcessServer(loop, COMPRESSOR, config) as compressor, InProcessServer(loop, DECODER, config) as decoder:
        for server in (compressor, decoder):
            wait_for_health(server.target, SERVING, timeout=300)
        capsys.readouterr()
        assert main(["compress", "--target", compressor.target, str(path), "--json"]) == 0
        remote = json.loads(capsys.readouterr().out)
        local = embedded.compress_text(path.read_text(encoding="utf-8"))
        assert int(remote["document_tokens"]) == local.n_tokens > 8192  # longer than the model's window
        assert remote["chunks"] == local.chunks and int(remote["stored_bytes"]) == local.stored_bytes

        questions = [
            ("What name did the women give to the son of Ruth and Boaz?", {}),
            ("Who is Naomi?", {"temperature": 0.8, "seed": 7}),
            ("Summarize the story of Hannah.", {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 11}),
        ]
        with grpc.insecure_channel(decoder.target) as channel:
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            for prompt, sampling in questions:
                params = {"max_new_tokens": 24, **sampling}
                started = time.perf_counter()
                responses, client_ttft = [], None
                request = dpb.GenerateRequest(context_id=remote["context_id"], prompt=prompt, **params)
                for response in stub.Generate(request):
                    client_ttft = client_ttft or (time.perf_counter() - started if response.token_ids else None)
                    responses.append(response)
                expected_text, expected_ids, finished = embedded_answer(
                    embedded, local.context_id, prompt, SamplingParams(**params)
                )
                assert text_and_ids(responses) == (expected_text, expected_ids), prompt
                server_ttft = responses[-1].timings.time_to_first_token_seconds
                with capsys.disabled():  # a measurement to read, not a pass/fail criterion
                    print(
                        f"\n{prompt[:40]!r}: time to first token over gRPC+Redis {client_ttft:.3f} s "
                        f"(server {server_ttft:.3f} s), embedded {finished.timings.time_to_first_token_s:.3f} s"
                    )

        # The command-line client streams the same answer.
        capsys.readouterr()
        prompt, _ = questions[0]
        argv = ["generate", "--target", decoder.target, "--context", remote["context_id"], prompt]
        assert main([*argv, "--max-new-tokens", "24", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (
            report["answer"]
            == embedded_answer(embedded, local.context_id, prompt, SamplingParams(max_new_tokens=24))[0]
        )
        assert report["usage"]["context_chunks"] == local.chunks


def test_health_says_when_the_store_has_no_room_for_a_context(loop, tiny_model_dir, tiny_adapter, make_redis_server):
    """A Redis at its memory limit still serves reads: the decoder stays SERVING while the
    compressor, whose every Compress would fail, says NOT_SERVING until there is room again."""
    redis = make_redis_server()
    config = server_config(
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", redis.url,
        "--health-interval-s", "0.1",
    )  # fmt: skip
    with InProcessServer(loop, COMPRESSOR, config) as compressor, InProcessServer(loop, DECODER, config) as decoder:
        for server in (compressor, decoder):
            wait_for_health(server.target, SERVING)
        client = redis.client()
        client.config_set("maxmemory", client.info("memory")["used_memory"])  # full from now on
        try:
            wait_for_health(compressor.target, NOT_SERVING, timeout=10)
            assert health(decoder.target) == SERVING
            with pytest.raises(ResourceExhausted, match="would not fit"):
                open_store(redis.url).ping(writes=True)
        finally:
            client.config_set("maxmemory", 0)
        wait_for_health(compressor.target, SERVING, timeout=10)
