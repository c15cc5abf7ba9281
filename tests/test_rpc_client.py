"""The one client of the services against the servicers' own conversions, without a server.

Every field of GenerateRequest that the decoder's servicer reads must be set by the client from
the runtime's arguments, and what the servicers write must come back as the runtime's own
results: a field added on one side and forgotten on the other fails here.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import grpc
import pytest

from sharedllm.common.engine.params import SAMPLING_FIELDS, SamplingParams
from sharedllm.common.engine.results import (
    Citation,
    CompressOutcome,
    CompressTimings,
    ContextRead,
    Finished,
    GenerateTimings,
    Passage,
    TokenDelta,
)
from sharedllm.common.generated.sharedllm.v1 import decoder_pb2 as dpb
from sharedllm.common.rpc.client import RemoteError, compress_outcome, events, generate_request
from sharedllm.compressor_service.servicer import compressed_context
from sharedllm.decoder_service.servicer import last_message, sampling_params

SERVICER = Path(__file__).resolve().parents[1] / "decoder_service" / "servicer.py"
# Every parameter away from its default, so an unset field cannot pass for a default one.
PARAMS = SamplingParams(
    max_new_tokens=17,
    temperature=0.7,
    top_k=11,
    top_p=0.9,
    min_p=0.05,
    repetition_penalty=1.2,
    seed=42,
    stop=("END", "\n\n"),
    grounding="facts",
    max_sentences=3,
    loop_guard=12,
)
OPTIONS = {"retrieval": False, "evidence_tokens": 256, "evidence_mode": "spread"}


def fields_the_servicer_reads() -> set[str]:
    """GenerateRequest fields named in the servicer: `request.<field>` and HasField("<field>"),
    and the sampling fields it reads by name (SAMPLING_FIELDS)."""
    names = {f.name for f in dpb.GenerateRequest.DESCRIPTOR.fields}
    read = set(SAMPLING_FIELDS)
    for node in ast.walk(ast.parse(SERVICER.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "request":
            read.add(node.attr)
        if isinstance(node, ast.Constant) and node.value in names:
            read.add(node.value)
    return read & names


def is_set(message, field) -> bool:
    if field.is_repeated:
        return len(getattr(message, field.name)) > 0
    if field.has_presence:
        return message.HasField(field.name)
    return getattr(message, field.name) != field.default_value


def test_the_servicer_reads_the_fields_this_test_expects():
    """The scan above finds what the servicer reads (it would pass vacuously if it found nothing)."""
    read = fields_the_servicer_reads()
    assert {"context_id", "prompt", "grounding", "disable_retrieval", "evidence_mode", "stop"} <= read
    assert set(SAMPLING_FIELDS) <= read


def test_the_client_sets_every_field_the_servicer_reads():
    """One context goes as context_id, several as context_ids (never both): between them, the
    two requests set every field."""
    one = generate_request("ctx-1", "Who is Naomi?", PARAMS, **OPTIONS)
    several = generate_request(["ctx-1", "ctx-2"], "Who is Naomi?", PARAMS, **OPTIONS)
    assert (one.context_id, list(one.context_ids)) == ("ctx-1", [])
    assert (several.context_id, list(several.context_ids)) == ("", ["ctx-1", "ctx-2"])

    def unset(names) -> list[str]:
        by_name = dpb.GenerateRequest.DESCRIPTOR.fields_by_name
        return sorted(n for n in names if not (is_set(one, by_name[n]) or is_set(several, by_name[n])))

    assert unset(fields_the_servicer_reads()) == []
    # ...and every field of the message, so a new one cannot hide from a servicer scan either.
    assert unset(f.name for f in dpb.GenerateRequest.DESCRIPTOR.fields) == []


def test_what_the_client_sends_is_what_the_servicer_hands_the_runtime():
    request = generate_request("ctx-1", "Who is Naomi?", PARAMS, **OPTIONS)
    assert sampling_params(request) == PARAMS
    assert (request.disable_retrieval, request.evidence_tokens, request.evidence_mode) == (True, 256, "spread")


@pytest.mark.parametrize("grounding", ["quote", "facts", "off"])
def test_default_parameters_travel_explicitly(grounding):
    """The client states the grounding even at its default: a server configured otherwise does not
    change what the caller asked for. Unset options stay unset (the server's defaults apply)."""
    params = SamplingParams(grounding=grounding)
    request = generate_request("ctx", "q", params)
    assert sampling_params(request) == params
    assert not request.HasField("evidence_tokens") and not request.HasField("evidence_mode")
    assert not request.disable_retrieval


def test_an_answer_comes_back_as_the_runtime_gave_it():
    evidence = (Passage(10, 20, 40, 90, "Naomi was the mother-in-law of Ruth.", 0.75),)
    citations = (Citation(0, 12, 40, 52, "Naomi was th", 0), Citation(13, 20, 400, 407, "of Ruth", None))
    sent = Finished(
        reason="repetition",
        text="Naomi was the mother-in-law of Ruth.",
        prompt_tokens=321,
        completion_tokens=9,
        timings=GenerateTimings(
            context_open_s=0.01,
            evidence_s=0.02,
            selection_s=0.03,
            context_load_s=0.04,
            prefill_s=0.05,
            time_to_first_token_s=0.2,
            decode_s=0.3,
        ),
        evidence=evidence,
        context=ContextRead(tokens=4096, chunks=8, bytes_read=123456, cached_nodes=5),
        citations=citations,
    )
    stream = [
        dpb.GenerateResponse(text="Naomi", token_ids=[7]),
        dpb.GenerateResponse(text=" was the mother-in-law of Ruth.", token_ids=[]),  # released text
        last_message(sent),
    ]
    got = list(events(stream))
    assert got[:2] == [TokenDelta(7, "Naomi"), TokenDelta(None, " was the mother-in-law of Ruth.")]
    # The wire carries the store reads (open + load) as one figure.
    timings = dataclasses.replace(sent.timings, context_open_s=0.0, context_load_s=sent.timings.context_read_s)
    assert got[2] == dataclasses.replace(sent, timings=timings)
    assert got[2].timings.time_to_first_token_s == pytest.approx(0.2)


def test_a_stream_without_its_last_message_is_an_error():
    with pytest.raises(RemoteError, match="without its last message") as raised:
        list(events([dpb.GenerateResponse(text="Na", token_ids=[7])]))
    assert raised.value.code == grpc.StatusCode.UNKNOWN and not raised.value.transient


def test_a_compression_comes_back_as_the_runtime_gave_it():
    outcome = CompressOutcome(
        context_id="doc-1",
        reused=False,
        n_tokens=40_000,
        chunks=79,
        stored_bytes=9_000_000,
        bytes_per_token=225.0,
        kv_cache_ratio=0.3,
        compression_ratio=8.0,
        timings=CompressTimings(tokenize_s=0.1, compress_s=5.0, store_s=0.2, total_s=5.3),
    )
    assert compress_outcome(compressed_context(outcome, 5.3)) == outcome


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.DATA_LOSS, False),
    ],
)
def test_errors_say_whether_a_retry_can_help(code, transient):
    error = RemoteError(code, "details")
    assert str(error) == f"{code.name}: details" and error.transient is transient
