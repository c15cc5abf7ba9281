"""Prompt blocks kept for prompts that begin the same way (engine/prefix_cache.py), and the
scheduler reusing them: the same answers to the bit, only within a scope, never a block that
reads the injection."""

from __future__ import annotations

import pytest
import torch

from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import EvidenceSettings, SamplingParams
from sharedllm.common.engine.prefix_cache import CachedBlock, PrefixCache
from sharedllm.common.engine.results import Finished, TokenDelta
from sharedllm.common.engine.scheduler import Scheduler

BLOCK = 4


def block(value: float, size: int = BLOCK) -> CachedBlock:
    return CachedBlock(torch.full((2, 1, size, 3), value), torch.full((2, 1, size, 3), -value))


def test_a_lookup_finds_the_leading_blocks_in_order_and_stops_at_the_first_missing_one():
    """And marks them used last to first: a prompt's first block, without which the others
    cannot be found, is the last of them to go."""
    cache = PrefixCache(1 << 20)
    tokens = list(range(20))
    cache.add("t", tokens[:4], block(1))
    cache.add("t", tokens[:8], block(2))
    cache.add("t", tokens[:16], block(4))  # the third block is missing: the fourth cannot be used
    found = cache.lookup("t", tokens, usable=19, block=BLOCK)
    assert [float(b.keys[0, 0, 0, 0]) for b in found] == [1, 2]
    assert cache.reused_blocks == 2
    assert len(cache.lookup("t", tokens, usable=7, block=BLOCK)) == 1  # only blocks within the usable tokens
    assert cache.lookup("t", [0, 1, 2, 9, 4, 5, 6, 7], usable=8, block=BLOCK) == []  # other tokens
    assert cache.lookup("another tenant", tokens, usable=19, block=BLOCK) == []
    cache.max_bytes = cache.bytes - 1  # one must go at the next add: the least recently used
    cache.add("t", [7] * BLOCK, block(7))
    assert cache.touch("t", tokens[:4]) and not cache.touch("t", tokens[:16])  # the orphan went first


def test_the_least_recently_used_blocks_go_first_when_the_budget_is_passed():
    one = block(0).nbytes
    cache = PrefixCache(3 * one)
    for n in range(3):
        cache.add("t", [n] * BLOCK, block(n))
    cache.lookup("t", [0] * BLOCK, usable=BLOCK, block=BLOCK)  # used again: now the most recent
    cache.add("t", [3] * BLOCK, block(3))
    assert not cache.touch("t", [1] * BLOCK) and cache.touch("t", [0] * BLOCK)
    assert cache.bytes == 3 * one and len(cache) == 3
    cache.add("t", [9] * 8, block(9, size=BLOCK * 4))  # larger than the whole budget: not kept
    assert not cache.touch("t", [9] * 8) and cache.bytes == 3 * one
    with pytest.raises(ValueError):
        PrefixCache(-1)


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_adapter):
    engine = Engine.load(model=str(tiny_model_dir), adapter=tiny_adapter)
    engine.decoder.block = 16
    return engine


def answer(events) -> tuple[list[int], str]:
    events = list(events)
    assert isinstance(events[-1], Finished)
    return [e.token_id for e in events if isinstance(e, TokenDelta) and e.token_id is not None], events[-1].text


def test_a_prompt_asked_again_starts_from_the_blocks_kept_and_answers_the_same(engine):
    """With excerpts in the window, the blocks before the question read no injection: a second
    asking starts after them, in the same scope only, and its answer is the answer without reuse."""
    text = "Ruth gleaned in the field of Boaz until the end of the barley harvest. " * 20
    tree = engine.compress(engine.tokenize_document(text)).tree
    plan = engine.plan(tree, "Who gleaned in the field?", max_new_tokens=8, evidence=EvidenceSettings())
    assert plan.injection is not None and plan.injection.shielded  # the question reads the tree, the rest not
    params = SamplingParams(max_new_tokens=8, grounding="off", loop_guard=0, max_sentences=0)
    alone = answer(engine.decoder.generate(plan.prompt_ids, plan.injection, params, engine.decode_text))
    scheduler = Scheduler(engine.decoder, max_batch=4, prefill_chunk=32)
    try:

        def ask(scope: str) -> tuple[list[int], str]:
            return answer(scheduler.generate(plan.prompt_ids, plan.injection, params, engine.decode_text, scope=scope))

        assert ask("a") == alone
        assert scheduler.stats().prefix_blocks_reused == 0 and scheduler.stats().prefix_cache_bytes > 0
        assert ask("a") == alone
        reused = scheduler.stats().prefix_blocks_reused
        before_question = plan.injection.shielded[0][1]
        assert reused == before_question // 16 > 0
        assert ask("b") == alone  # another tenant's prompt reads its own blocks
        assert scheduler.stats().prefix_blocks_reused == reused
    finally:
        scheduler.close()


def test_blocks_that_read_the_injection_are_never_kept(engine):
    """Without excerpts every position reads the tree: nothing of the prompt is kept or reused."""
    text = "The meeting moved to Thursday at nine in the morning. " * 30
    tree = engine.compress(engine.tokenize_document(text)).tree
    plan = engine.plan(tree, "When is the meeting? " * 4, max_new_tokens=4, evidence=EvidenceSettings(tokens=0))
    assert plan.injection is not None and not plan.injection.shielded
    params = SamplingParams(max_new_tokens=4, grounding="off", loop_guard=0, max_sentences=0)
    scheduler = Scheduler(engine.decoder, max_batch=4, prefill_chunk=32)
    try:
        for _ in range(2):
            answer(scheduler.generate(plan.prompt_ids, plan.injection, params, engine.decode_text))
        assert scheduler.stats().prefix_cache_bytes == 0 and scheduler.stats().prefix_blocks_reused == 0
    finally:
        scheduler.close()


FREE = SamplingParams(max_new_tokens=3, grounding="off", loop_guard=0, max_sentences=0)


@pytest.mark.parametrize("length", [1, 32, 33, 48])  # blocks of 16 here: one token, 2 blocks, 2 blocks + 1, 3
def test_a_prompt_reuses_the_whole_blocks_before_its_last_token(engine, length):
    prompt = [(7 * i) % 300 + 3 for i in range(length)]
    alone = answer(engine.decoder.generate(prompt, None, FREE, engine.decode_text))
    scheduler = Scheduler(engine.decoder, max_batch=2, prefill_chunk=16)
    try:
        for _ in range(2):
            assert answer(scheduler.generate(prompt, None, FREE, engine.decode_text)) == alone
        assert scheduler.stats().prefix_blocks_reused == (length - 1) // 16
    finally:
        scheduler.close()


def test_a_block_that_cannot_be_kept_fails_no_answer(engine, monkeypatch):
    def out_of_memory(*args):
        raise MemoryError("no room for the copy")

    monkeypatch.setattr(CachedBlock, "read", out_of_memory)
    prompt = [(5 * i) % 300 + 3 for i in range(40)]
    alone = answer(engine.decoder.generate(prompt, None, FREE, engine.decode_text))
    scheduler = Scheduler(engine.decoder, max_batch=2, prefill_chunk=16)
    try:
        assert answer(scheduler.generate(prompt, None, FREE, engine.decode_text)) == alone
        assert scheduler.stats().prefix_cache_bytes == 0
    finally:
        scheduler.close()
