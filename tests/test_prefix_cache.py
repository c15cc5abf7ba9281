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


def test_the_least_recently_used_blocks_go_first_when_the_budget_is_passed():
    one = block(0).nbytes
    cache = PrefixCache(3 * one)
    for n in range(3):
        cache.add("t", [n] * BLOCK, block(n))
    cache.lookup("t", [0] * BLOCK, usable=BLOCK, block=BLOCK)  # used again: now the most recent
    cache.add("t", [3] * BLOCK, block(3))
    assert ("t", [1] * BLOCK) not in cache and ("t", [0] * BLOCK) in cache
    assert cache.bytes == 3 * one and len(cache) == 3
    cache.add("t", [9] * 8, block(9, size=BLOCK * 4))  # larger than the whole budget: not kept
    assert ("t", [9] * 8) not in cache and cache.bytes == 3 * one
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
