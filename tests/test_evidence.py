"""Evidence in the decoder's window: passages, ranking, multi-hop, budgets, and the plan the engine builds."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import re
import sys

import numpy as np
import pytest
import torch

from sharedllm.common.config import TreeConfig
from sharedllm.common.engine import evidence as evidence_module
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.evidence import (
    EXCERPTS_HEADER,
    EvidenceSettings,
    PassageIndex,
    choose,
    rank,
    render,
    shielded_spans,
    split_passages,
)
from sharedllm.common.engine.retrieval import select_nodes
from sharedllm.common.errors import InvalidInput
from sharedllm.common.evaluation.methods import PLAIN_PASSAGE_TOKENS, plain_bm25

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TREE = TreeConfig(n_layers=2, chunk_size=64, depth=2, pool_size=4)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(model=str(tiny_model_dir), tree_config=TREE)


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.tokenizer


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_passages_cover_the_document_and_end_at_sentences(tokenizer):
    text = "".join(f"Sentence number {i} says something rather long about item {i}. " for i in range(200))
    ids = ids_of(tokenizer, text)
    spans = split_passages(ids, tokenizer, 32)
    assert spans[0][0] == 0 and spans[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous, no gaps or overlaps
    assert all(0 < e - s <= 32 for s, e in spans)
    index = PassageIndex(ids, tokenizer, 32)
    assert sum(t.rstrip().endswith(".") for t in index.texts[:-1]) >= 0.9 * (len(index) - 1)


@pytest.mark.parametrize(
    "text",
    [
        "Ünïcödé — naïve café. " + FILLER * 30 + "Ωmega ends here.",
        "长文档没有英文句号所以切分会落在多字节字符的中间" * 12 + "。" + "😀🚀✨" * 20,  # no sentence ends it knows
    ],
)
def test_character_offsets_index_the_decoded_document(tokenizer, text):
    ids = ids_of(tokenizer, text)
    index = PassageIndex(ids, tokenizer, 24)
    assert tokenizer.decode(ids) == text  # byte-level BPE: the decoded document is the document
    for i in range(len(index)):
        p = index.passage(i, 0.0)
        assert text[p.char_start : p.char_end] == p.text
        assert tokenizer.decode(ids[p.token_start : p.token_end]) == p.text


def planted(tokenizer, facts: dict[float, str], n_filler: int = 120, seed: int = 0) -> tuple[str, list[int]]:
    """Filler sentences with `facts` inserted at the given depths (shuffled filler, so passages differ)."""
    rng = random.Random(seed)
    sentences = [s.strip() + "." for s in FILLER.split(".") if s.strip()] * (n_filler // 5)
    rng.shuffle(sentences)
    for depth, fact in sorted(facts.items(), reverse=True):
        sentences.insert(int(depth * len(sentences)), fact)
    text = " ".join(sentences)
    return text, ids_of(tokenizer, text)


def test_a_named_fact_ranks_first_and_passages_come_in_document_order(tokenizer):
    _, ids = planted(tokenizer, {0.7: "The secret locker code of Amara Okafor is 4817."})
    index = PassageIndex(ids, tokenizer, 32)
    settings = EvidenceSettings(tokens=128, passage_tokens=32, hops=0)
    ranking = rank(index, "What is the locker code of Amara Okafor?", None, settings)
    assert "4817" in index.texts[ranking.priority[0]]
    chosen = choose(index, ranking, 128)
    assert sum(p.token_end - p.token_start for p in chosen) <= 128
    assert [p.token_start for p in chosen] == sorted(p.token_start for p in chosen)
    assert any("4817" in p.text for p in chosen)
    message = render(chosen, "What is the locker code?")
    assert message.startswith(EXCERPTS_HEADER) and message.endswith("What is the locker code?")
    assert message.index("4817") < message.index("What is the locker code?")


def test_multi_hop_follows_a_chain_of_assignments(tokenizer):
    chain = {
        0.1: "VAR QWXZT = 52817.",
        0.3: "VAR PLMKO = VAR QWXZT.",
        0.55: "VAR ZZRTY = VAR PLMKO.",
        0.8: "VAR BNMVC = VAR ZZRTY.",
    }
    _, ids = planted(tokenizer, chain, n_filler=300)
    index = PassageIndex(ids, tokenizer, 24)
    question = "Find all variables that are assigned the value 52817 in the text above."
    names = ("QWXZT", "PLMKO", "ZZRTY", "BNMVC")

    def found(hops: int) -> set[str]:
        settings = EvidenceSettings(tokens=4 * 24, passage_tokens=24, hops=hops)
        chosen = choose(index, rank(index, question, None, settings), settings.tokens)
        return {n for n in names if any(f"VAR {n} =" in p.text for p in chosen)}

    assert found(hops=3) == set(names)
    assert found(hops=2) == set(names[:3])  # each hop brings exactly one more link
    assert found(hops=0) == {"QWXZT"}  # the question names only the value: without hops, one link


def test_a_passage_never_ends_at_a_colon_so_a_value_stays_with_its_key(tokenizer):
    text = " ".join(f"The sky is blue. The magic number for key{i} is: {1000 + i}." for i in range(200))
    ids = ids_of(tokenizer, text)
    for size in (24, 32, 96):
        index = PassageIndex(ids, tokenizer, size)
        assert not any(t.rstrip().endswith(":") for t in index.texts[:-1])
        assert sum(t.count(" is: ") for t in index.texts) == 200  # no "is:" cut from the space after it


def test_only_the_question_reads_the_injection_unless_asked():
    question, length = (40, 52), 70
    assert shielded_spans(EvidenceSettings(), question, length) == ((0, 40), (52, 70))
    assert shielded_spans(EvidenceSettings(inject_excerpts=True), question, length) == ((52, 70),)
    assert shielded_spans(EvidenceSettings(inject_answer=True), question, length) == ((0, 40),)
    assert shielded_spans(EvidenceSettings(inject_excerpts=True, inject_answer=True), question, length) == ()


def test_plain_bm25_keeps_the_budget_and_drops_what_the_method_adds(tokenizer):
    """The `bm25` baseline: same budget, ~100-token passages, no hops: one link of the chain."""
    names = ("QWXZT", "PLMKO", "ZZRTY")
    chain = {0.1: "VAR QWXZT = 52817.", 0.5: "VAR PLMKO = VAR QWXZT.", 0.9: "VAR ZZRTY = VAR PLMKO."}
    _, ids = planted(tokenizer, chain, n_filler=400)
    question = "Find all variables that are assigned the value 52817 in the text above."
    found = {}
    for name, settings in (
        ("product", EvidenceSettings(tokens=192)),
        ("plain", plain_bm25(EvidenceSettings(tokens=192))),
    ):
        index = PassageIndex(ids, tokenizer, settings.passage_tokens)
        chosen = choose(index, rank(index, question, None, settings), settings.tokens)
        found[name] = {n for n in names if any(f"VAR {n} =" in p.text for p in chosen)}
    assert plain_bm25(EvidenceSettings()).passage_tokens == PLAIN_PASSAGE_TOKENS
    assert found == {"product": set(names), "plain": {"QWXZT"}}


def test_the_default_hops_follow_rulers_five_name_chain_to_its_end(tokenizer):
    """RULER's variable tracking has 4 assignments after the value: 4 hops, one more than the old default."""
    names = ("QWXZT", "PLMKO", "ZZRTY", "BNMVC", "HJKLQ")
    chain = {0.1: f"VAR {names[0]} = 52817."} | {
        0.1 + 0.2 * i: f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
    }
    _, ids = planted(tokenizer, chain, n_filler=400)
    index = PassageIndex(ids, tokenizer, 24)
    question = "Find all variables that are assigned the value 52817 in the text above."
    settings = EvidenceSettings(tokens=8 * 24, passage_tokens=24)
    chosen = choose(index, rank(index, question, None, settings), settings.tokens)
    assert {n for n in names if any(f"VAR {n} =" in p.text for p in chosen)} == set(names)


def test_no_lexical_match_spreads_over_the_document_and_spread_mode_covers_it(tokenizer):
    _, ids = planted(tokenizer, {}, n_filler=400)
    index = PassageIndex(ids, tokenizer, 32)
    tree = np.random.default_rng(0).random(len(index))
    for settings in (
        EvidenceSettings(tokens=256, passage_tokens=32),
        EvidenceSettings(tokens=256, passage_tokens=32, mode="spread"),
    ):
        chosen = choose(index, rank(index, "Zyxwvu qponm?", tree, settings), 256)
        starts = [p.token_start for p in chosen]
        assert starts[0] < len(ids) * 0.2 and starts[-1] > len(ids) * 0.6


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"tokens": -1}, "evidence_tokens must be >= 0, got -1"),
        ({"passage_tokens": 2}, "passage_tokens must be in [8, 1024], got 2"),
        ({"hops": -1}, "hops must be >= 0, got -1"),
        ({"mode": "everything"}, "evidence mode must be one of auto, spread, got 'everything'"),
        ({"min_score": 1.5}, "min_score must be in [0, 1], got 1.5"),
        ({"tree_weight": float("nan")}, "tree_weight must be finite and >= 0, got nan"),
        ({"tree_weight": -0.5}, "tree_weight must be finite and >= 0, got -0.5"),
        ({"hop_max_df": 0}, "hop_max_df must be >= 1, got 0"),
        ({"neighbours_of": -1}, "neighbours_of must be >= 0, got -1"),
    ],
)
def test_settings_refuse_a_bad_field_where_they_are_made(bad, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        EvidenceSettings(**bad)
    with pytest.raises(InvalidInput, match=re.escape(message)):  # a request's overrides, as the runtime applies them
        dataclasses.replace(EvidenceSettings(), **bad)


def test_bias_steers_node_expansion():
    keys = torch.zeros(1, 6, 4)
    keys[0, :, 0] = 1.0  # every node equally similar to the query
    query = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert select_nodes(keys, query, 2)[0].tolist() == [0, 4, 5]  # ties expand right
    bias = torch.zeros(1, 6)
    bias[0, 0] = bias[0, 2] = 1.0  # the ranking points at the first quarter
    assert select_nodes(keys, query, 2, bias)[0].tolist() == [2, 3, 1]


def test_plan_fills_the_window_within_its_limits(engine, tokenizer, monkeypatch, caplog):
    _, ids = planted(tokenizer, {0.5: "The secret locker code of Amara Okafor is 4817."}, n_filler=400)
    tree = engine.compressor.compress(ids)
    question = "What is the locker code of Amara Okafor?"
    bare = engine.plan(tree, question, max_new_tokens=8, evidence=EvidenceSettings(tokens=0))
    assert bare.prompt_ids == engine.prompt_ids(question) and bare.evidence == () and bare.injection is not None

    plan = engine.plan(tree, question, max_new_tokens=8, evidence=EvidenceSettings(tokens=200, passage_tokens=32))
    assert 0 < sum(p.token_end - p.token_start for p in plan.evidence) <= 200
    assert any("4817" in p.text for p in plan.evidence)
    assert "4817" in tokenizer.decode(plan.prompt_ids)

    # Only the question reads the tree: the system prompt and the excerpts before it pass through
    # the base model as text, and so do the template after it and the answer.
    (low, high), (after, end) = plan.injection.shielded
    assert low == 0 and end == sys.maxsize and high < after < len(plan.prompt_ids)
    assert EXCERPTS_HEADER in tokenizer.decode(plan.prompt_ids[:high])
    assert "4817" in tokenizer.decode(plan.prompt_ids[:high])
    assert tokenizer.decode(plan.prompt_ids[high:after]) == question

    # A template that hides the question's tokens: the whole prompt reads the tree, the answer does not.
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(evidence_module, "find_tokens", lambda *args, **kwargs: None)
        hidden = engine.plan(tree, question, max_new_tokens=8, evidence=EvidenceSettings(tokens=200, passage_tokens=32))
    assert hidden.injection.shielded == ((0, 0), (len(hidden.prompt_ids), sys.maxsize))
    assert "the whole prompt reads the injection" in caplog.text

    both = EvidenceSettings(tokens=200, passage_tokens=32, inject_excerpts=True, inject_answer=True)
    assert engine.plan(tree, question, max_new_tokens=8, evidence=both).injection.shielded == ()

    alone = engine.plan(
        tree, question, max_new_tokens=8, evidence=EvidenceSettings(tokens=200, passage_tokens=32), inject=False
    )
    assert alone.injection is None and alone.prompt_ids == plan.prompt_ids

    # A budget larger than the window is clipped to what fits beside the question and the answer.
    fill = EvidenceSettings(tokens=100_000, min_score=0.0)
    huge = engine.plan(tree, question, max_new_tokens=100, evidence=fill)
    assert len(huge.prompt_ids) + 100 <= engine.window
    assert sum(p.token_end - p.token_start for p in huge.evidence) > engine.window // 2
    # With the default relevance floor, filler that matches nothing is not added just because it fits.
    focused = engine.plan(tree, question, max_new_tokens=100, evidence=EvidenceSettings(tokens=100_000))
    assert any("4817" in p.text for p in focused.evidence) and len(focused.evidence) < len(huge.evidence)

    # A spread over the document spans all of it even when the window clips the budget.
    spread = engine.plan(tree, question, max_new_tokens=100, evidence=EvidenceSettings(tokens=100_000, mode="spread"))
    assert spread.evidence[0].token_start < len(ids) * 0.1 and spread.evidence[-1].token_end > len(ids) * 0.9

    prefixed = engine.plan(
        tree, question, max_new_tokens=8, evidence=EvidenceSettings(tokens=0), answer_prefix="The code is"
    )
    assert prefixed.prompt_ids == bare.prompt_ids + ids_of(tokenizer, "The code is")


def test_shielded_positions_read_no_injection(tiny_model_dir):
    import dataclasses

    from sharedllm.common.engine.adapter import InjectionAdapter

    engine = Engine.load(model=str(tiny_model_dir), tree_config=TREE)
    adapter = InjectionAdapter.initialise(engine.body, TREE)
    for block in adapter.blocks:  # a non-zero o_proj, so the injection changes the output
        block.o_proj.weight.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    engine = Engine(engine.loaded, adapter)
    tree = engine.compressor.compress(ids_of(engine.tokenizer, FILLER * 20))
    injection, _ = engine.decoder.prepare(tree, None)
    ids = torch.tensor([ids_of(engine.tokenizer, "Where is the grass, and what colour is it?")])
    with torch.inference_mode():
        plain = engine.decoder.forward(ids, 0, None, None)
        injected = engine.decoder.forward(ids, 0, None, injection)
        shielded = engine.decoder.forward(ids, 0, None, dataclasses.replace(injection, shielded=((0, ids.shape[1]),)))
        half = engine.decoder.forward(ids, 0, None, dataclasses.replace(injection, shielded=((0, 4),)))
    assert not torch.allclose(plain, injected, atol=1e-4)
    assert torch.equal(shielded, plain)
    assert torch.equal(half[:, :4], plain[:, :4]) and not torch.allclose(half[:, 4:], plain[:, 4:], atol=1e-4)
    # A decode step of the answer, shielded from its position on: the blocks do not run at all.
    step = torch.tensor([[ids[0, -1].item()]])
    with torch.inference_mode():
        free = engine.decoder.forward(step, ids.shape[1], None, None)
        answer = engine.decoder.forward(
            step, ids.shape[1], None, dataclasses.replace(injection, shielded=((ids.shape[1], sys.maxsize),))
        )
        read = engine.decoder.forward(step, ids.shape[1], None, injection)
    assert torch.equal(answer, free) and not torch.allclose(read, free, atol=1e-4)
