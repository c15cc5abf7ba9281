"""Scale-out on one store: two compressors and two decoders serve the same contexts, and a client
given both replicas' addresses keeps answering while one of them goes away."""

from __future__ import annotations

import pytest
from grpc_stack import SERVING, EventLoopThread, InProcessServer, server_config, wait_for_health

from sharedllm.common.generated.sharedllm.v1 import compressor_pb2 as cpb
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2_grpc, decoder_pb2_grpc
from sharedllm.common.generated.sharedllm.v1 import decoder_pb2 as dpb
from sharedllm.common.rpc.client import channel_target, open_channel
from sharedllm.compressor_service.server import SPEC as COMPRESSOR
from sharedllm.decoder_service.server import SPEC as DECODER

TEXT = "Naomi went with Ruth to Bethlehem, and Boaz saw her in the field of barley. " * 20


def test_targets_name_one_address_several_replicas_or_a_uri():
    assert channel_target("localhost:50052") == "localhost:50052"
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("dns:///decoder.sharedllm.svc:50052") == "dns:///decoder.sharedllm.svc:50052"


@pytest.fixture(scope="module")
def loop():
    thread = EventLoopThread()
    yield thread
    thread.close()


def answer(target: str, context_id: str) -> str:
    with open_channel(target) as channel:
        request = dpb.GenerateRequest(context_id=context_id, prompt="Who is Naomi?", max_new_tokens=8)
        return "".join(r.text for r in decoder_pb2_grpc.DecoderServiceStub(channel).Generate(request, timeout=60))


def test_two_compressors_and_two_decoders_on_one_store(loop, tiny_model_dir, tiny_adapter, make_redis_server):
    redis = make_redis_server()
    config = server_config("--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", redis.url)
    servers = [InProcessServer(loop, spec, config) for spec in (COMPRESSOR, COMPRESSOR, DECODER, DECODER)]
    for server in servers:
        server.__enter__()
    try:
        for server in servers:
            wait_for_health(server.target, SERVING)
        c1, c2, d1, d2 = servers
        ids = []
        for compressor in (c1, c2):  # each compressor stores; both decoders read what either stored
            with open_channel(compressor.target) as channel:
                stub = compressor_pb2_grpc.CompressorServiceStub(channel)
                ids.append(stub.Compress(cpb.CompressRequest(text=f"{len(ids)} {TEXT}".encode())).context.context_id)
        for context_id in ids:
            assert answer(d1.target, context_id) == answer(d2.target, context_id) != ""

        both = f"{d1.target},{d2.target}"
        expected = [answer(d1.target, context_id) for context_id in ids]
        assert [answer(both, context_id) for context_id in ids * 2] == expected * 2
        d1.__exit__(None, None, None)  # one replica goes away (drains and closes its port)
        servers.remove(d1)
        assert [answer(both, context_id) for context_id in ids * 3] == expected * 3  # the other answers all
    finally:
        for server in servers:
            server.__exit__(None, None, None)


def test_an_answer_cut_off_by_a_dying_decoder_is_finished_by_another(
    tiny_model_dir, tiny_adapter, make_redis_server, tmp_path, caplog
):
    """Two decoder processes behind one client; the one answering is SIGKILLed mid-answer. The
    client asks again, the other replica answers, and the caller reads one whole answer: the same
    text, token for token, as an answer nobody interrupted."""
    from test_soak import serve, wait_serving

    from sharedllm.common.engine.params import SamplingParams
    from sharedllm.common.engine.results import Finished, TokenDelta, run_to_end
    from sharedllm.common.rpc.client import CompressorClient, DecoderClient

    redis = make_redis_server()
    started = {
        name: serve(name.rstrip("12"), redis.url, tiny_model_dir, tiny_adapter, tmp_path / f"{name}.log")
        for name in ("compressor", "decoder1", "decoder2")
    }
    try:
        for name, (process, target) in started.items():
            wait_serving(process, target, tmp_path / f"{name}.log")
        with CompressorClient(started["compressor"][1]) as compressor:
            context_id = compressor.compress(TEXT.encode()).context_id
        params = SamplingParams(max_new_tokens=900, grounding="off", loop_guard=0, max_sentences=0)
        decoders = [started["decoder1"], started["decoder2"]]
        with DecoderClient(decoders[0][1]) as one:
            expected = run_to_end(one.generate(context_id, "Who is Naomi?", params)).text
        events = []
        with DecoderClient(",".join(target for _, target in decoders)) as client:
            for event in client.generate(context_id, "Who is Naomi?", params):
                events.append(event)
                if len(events) == 3:
                    busy = []
                    for process, target in decoders:
                        with DecoderClient(target) as probe:
                            if probe.server_info().stats.active_requests:
                                busy.append(process)
                    assert len(busy) == 1, "the answer ended before a decoder could be stopped"
                    busy[0].kill()
        assert busy[0].wait(10) is not None
        text = "".join(e.text for e in events if isinstance(e, TokenDelta))
        assert isinstance(events[-1], Finished) and events[-1].text == text == expected
        assert len(expected) > 200
        assert "the decoder stopped in the answer" in caplog.text  # asked again, mid-answer
    finally:
        for process, _ in started.values():
            process.kill()
            process.wait(10)
