"""Incremental text with stop strings, on the default model's real tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sharedllm.common.engine.streaming import TextStream
from sharedllm.common.model_loading import resolve_model_path

TEXTS = [
    "Hello world, this is a test. Ünïcödé 日本語 text 🙂 with emoji!\n  indented  spaces",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def decode():
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    return tokenizer, lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def stream(decode, ids, stop=()) -> tuple[str, bool]:
    text_stream = TextStream(decode, stop)
    out = ""
    for token in ids:
        out += text_stream.push(token)
        if text_stream.stopped:
            break
    return out + text_stream.flush(), text_stream.stopped


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_full_decode(decode, text):
    tokenizer, dec = decode
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert stream(dec, ids) == (dec(ids), False)


@pytest.mark.parametrize(
    ("text", "stop"),
    [(TEXTS[0], s) for s in ("test", "日本", "🙂", "spaces")] + [(TEXTS[1], s) for s in ("x **", "comment")],
)
def test_stop_strings_cut_before_the_stop(decode, text, stop):
    tokenizer, dec = decode
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = dec(ids)
    assert stream(dec, ids, (stop,)) == (full[: full.find(stop)], True)


def test_a_stop_string_completed_by_the_last_token_is_cut_at_flush():
    # The token that completes "STOP" also opens a multi-byte character, so push holds it back.
    pieces = {1: "ab", 2: "STOP\ufffd"}
    text_stream = TextStream(lambda ids: "".join(pieces[i] for i in ids), ("STOP",))
    out = text_stream.push(1) + text_stream.push(2) + text_stream.flush()
    assert out == "ab" and text_stream.stopped
