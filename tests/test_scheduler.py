"""Continuous batching (engine/scheduler.py): answers in flight together are the answers alone.

The tiny model with an adapter whose injection changes the output, several documents of
different lengths at once (so rows differ in prompt length, cache length and tree), questions
with excerpts in the window (the answer's steps read no tree) and without (every step reads it).
Attention blocks of 16 tokens (the tiny prompts would fit one block of the default 128), so
prompts are cut into several pieces.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import Finished, TokenDelta
from sharedllm.common.engine.scheduler import Scheduler, _Row
from sharedllm.common.kernels.packed_linear import PackedLinear
from sharedllm.common.runtime import ContextRuntime
from sharedllm.common.store import open_store

DOCUMENTS = [
    "The cat sat on the mat. The dog lay by the door. " * 12,
    "Ruth gleaned in the field of Boaz until the end of the barley harvest. " * 25,
    "A short note: the meeting moved to Thursday at nine. " * 4,
]
BLOCK = 16
QUESTIONS = ["Where is the cat?", "Who gleaned in the field?", "When is the meeting?", "What happened?"]


@pytest.fixture(scope="module")
def runtime(tiny_model_dir, tiny_adapter):
    engine = Engine.load(model=str(tiny_model_dir), adapter=tiny_adapter)
    engine.decoder.block = BLOCK
    runtime = ContextRuntime(engine, open_store("memory://"), default_ttl_s=None)
    runtime.context_ids = [runtime.compress_text(text).context_id for text in DOCUMENTS]
    yield runtime
    if engine.scheduler is not None:
        engine.scheduler.close()


def requests(runtime) -> list[tuple[str, str, SamplingParams, int]]:
    """(context id, question, params, evidence tokens): three documents, with and without excerpts,
    greedy and seeded sampling, answers of different lengths."""
    free = {"grounding": "off", "loop_guard": 0, "max_sentences": 0}
    made = []
    for i, context_id in enumerate(runtime.context_ids):
        for j, question in enumerate(QUESTIONS[:3]):
            sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 7 + j} if (i + j) % 3 == 2 else {}
            params = SamplingParams(max_new_tokens=6 + 5 * j, **free, **sampling)
            made.append((context_id, question, params, 0 if (i + j) % 2 else 64))
    return made


def answer(runtime, request) -> tuple[list[int], str, str]:
    context_id, question, params, evidence = request
    events = list(runtime.generate(context_id, question, params, evidence_tokens=evidence))
    ids = [e.token_id for e in events if isinstance(e, TokenDelta) and e.token_id is not None]
    finished = events[-1]
    assert isinstance(finished, Finished)
    return ids, finished.text, finished.reason


def test_answers_batched_are_the_answers_alone(runtime):
    engine = runtime.engine
    assert engine.scheduler is None
    work = requests(runtime)
    unbatched = [answer(runtime, r) for r in work]  # the one-answer decoder, no scheduler
    engine.start_batching(max_batch=4, prefill_chunk=32)
    alone = [answer(runtime, r) for r in work]
    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(lambda r: answer(runtime, r), work))
    stats = engine.scheduler.stats()
    assert together == alone == unbatched
    assert all(len(ids) > 0 for ids, _, _ in together)
    assert stats.rows == 0 and stats.steps > 0 and stats.prefill_chunks > len(work)  # prompts came in pieces
    assert 1 <= stats.last_batch <= 4


def test_a_cancelled_answer_leaves_the_others_intact(runtime):
    engine = runtime.engine
    engine.start_batching(max_batch=4, prefill_chunk=32)
    work = requests(runtime)[:5]
    alone = [answer(runtime, r) for r in work]
    stop_after = 2
    started = threading.Barrier(len(work))

    def cancelled() -> int:
        context_id, question, params, evidence = work[0]
        params = SamplingParams(**{**params.__dict__, "max_new_tokens": 64})
        events = runtime.generate(context_id, question, params, evidence_tokens=evidence)
        started.wait()
        taken = 0
        for event in events:
            taken += isinstance(event, TokenDelta)
            if taken == stop_after:
                events.close()  # the caller left: its row leaves at once, its cache with it
                break
        return taken

    def others(request):
        started.wait()
        return answer(runtime, request)

    with ThreadPoolExecutor(len(work) + 1) as pool:
        gone = pool.submit(cancelled)
        rest = list(pool.map(others, work[1:]))
    assert gone.result() == stop_after
    assert rest == alone[1:]
    assert engine.scheduler.stats().rows == 0  # the cancelled row's cache went with it


def test_a_failing_step_is_raised_to_its_caller_and_the_scheduler_goes_on(runtime):
    """An error in the scheduler's thread (here a token id the model does not have) is raised to
    that answer's caller; the scheduler goes on serving the others."""
    engine = runtime.engine
    engine.start_batching(max_batch=4, prefill_chunk=32)
    params = SamplingParams(max_new_tokens=4, grounding="off")
    broken = engine.scheduler.generate([1, 2, engine.body.embed.num_embeddings + 5], None, params, engine.decode_text)
    with pytest.raises(IndexError):
        list(broken)
    work = requests(runtime)[0]
    assert answer(runtime, work)[0]
    assert engine.scheduler.stats().rows == 0


def test_prompts_waiting_together_are_read_in_one_step(runtime, monkeypatch):
    """With a budget larger than the prompts, those waiting at once share steps (oldest first),
    beside the answers decoding, and every answer is still the answer alone."""
    engine = runtime.engine
    work = requests(runtime)
    alone = [answer(runtime, r) for r in work]
    prompts_per_step: list[int] = []
    step_rows = engine.decoder.step_rows
    scheduler = Scheduler(engine.decoder, max_batch=len(work), prefill_chunk=4096)

    def counted(pieces, caches, injections):
        if not prompts_per_step:  # the first step waits for every answer to ask, so prompts queue up
            deadline = time.monotonic() + 30
            while scheduler.stats().rows < len(work) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # each has handed in its prompt
        prompts_per_step.append(sum(len(piece) > 1 for piece in pieces))
        return step_rows(pieces, caches, injections)

    monkeypatch.setattr(engine.decoder, "step_rows", counted)
    monkeypatch.setattr(engine, "scheduler", scheduler)
    try:
        with ThreadPoolExecutor(len(work)) as pool:
            together = list(pool.map(lambda r: answer(runtime, r), work))
    finally:
        engine.scheduler.close()
    assert together == alone
    assert max(prompts_per_step) >= 2


@pytest.mark.parametrize(
    ("max_batch", "expected_pieces"),
    [
        (4, [70]),  # 3 answers decode: the prompts share the one row left
        # Room for all, oldest first: the second prompt's piece ends at the last block end
        # within the 100-token budget (16 tokens), and the third waits (no block end within 14).
        (8, [70, 16]),
    ],
)
def test_a_step_keeps_decoding_rows_and_shares_the_prompt_budget(runtime, max_batch, expected_pieces):
    engine = runtime.engine
    scheduler = Scheduler(engine.decoder, max_batch=max_batch, prefill_chunk=100)

    def row(past: int, pending: int, arrived: float) -> _Row:
        made = _Row(engine.body.new_cache(128), None, pending=[1] * pending, arrived=arrived)
        made.cache.length = past
        return made

    decoding = [row(10, 1, t) for t in (3.0, 4.0, 5.0)]
    prompts = [row(0, 70, t) for t in (0.0, 1.0, 2.0, 6.0)]  # three of them older than every answer
    try:
        with scheduler._lock:  # the scheduler's thread is not woken: these rows are only looked at
            scheduler._rows.extend(decoding + prompts)
            chosen, reading = scheduler._choose()
            scheduler._rows.clear()
    finally:
        scheduler.close()
    assert chosen == decoding[: max_batch - len(expected_pieces)]
    assert reading == list(zip(prompts, expected_pieces, strict=False))


def test_a_row_has_the_same_bits_alone_and_batched_with_its_prompt_in_pieces(runtime):
    """The logits of a prompt read whole, alone, and read in pieces (cut at block ends) beside
    another answer's prompt and decoding steps are the same bits, and so are the steps after."""
    engine = runtime.engine
    decoder = engine.decoder
    if not isinstance(engine.body.layers[0].self_attn.q_proj, PackedLinear):
        pytest.skip("rows are independent to the bit only with the packed linears (CPU, oneDNN)")
    injection, _ = decoder.prepare(engine.compress([(13 * i) % 400 + 3 for i in range(300)]).tree, None)
    injection = replace(injection, shielded=((20, 50),))  # some prompt tokens read the tree, some not
    prompt = [(7 * i) % 500 + 3 for i in range(90)]
    other = [(11 * i) % 500 + 3 for i in range(40)]
    answer = [5, 9, 13]

    cache = engine.body.new_cache(128)
    alone = [decoder.step_rows([prompt], [cache], [injection])[0]]
    alone += [decoder.step_rows([[token]], [cache], [injection])[0] for token in answer]

    cache, beside = engine.body.new_cache(128), engine.body.new_cache(128)
    pairs = [decoder.step_rows([prompt[:BLOCK], other[: 2 * BLOCK]], [cache, beside], [injection, None])]
    pairs.append(decoder.step_rows([prompt[BLOCK : 4 * BLOCK], other[2 * BLOCK :]], [cache, beside], [injection, None]))
    pairs.append(decoder.step_rows([prompt[4 * BLOCK :], [21]], [cache, beside], [injection, None]))
    batched = [pairs[-1][0]]
    batched += [decoder.step_rows([[t], [21]], [cache, beside], [injection, None])[0] for t in answer]
    assert all(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))
