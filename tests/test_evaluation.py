"""The StreamingLLM baseline's correctness, and `eval ppl` / `eval needle` end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sharedllm.cli import build_parser
from sharedllm.common.baselines.streaming import StreamingLLM
from sharedllm.common.config import TreeConfig
from sharedllm.common.data.corpora import fetch, read_manifest
from sharedllm.common.data.shards import load_document_tokens
from sharedllm.common.engine.engine import Engine
from sharedllm.common.engine.llama import apply_rope
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import TokenDelta
from sharedllm.common.errors import InvalidInput
from sharedllm.common.evaluation.heldout import heldout_documents
from sharedllm.common.evaluation.ppl import window_starts
from sharedllm.common.training.trainer import gap_closed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TREE = ["--layers", "2", "--chunk-size", "64", "--depth", "2", "--pool-size", "8"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(
        model=str(tiny_model_dir), tree_config=TreeConfig(n_layers=2, chunk_size=64, depth=2, pool_size=8)
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    fetch(directory, corpora=("bible",))
    return directory


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _plain_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    body = engine.body
    with torch.inference_mode():
        positions = torch.arange(len(ids)).unsqueeze(0)
        h = body.forward_layers(body.embed(torch.tensor([ids])), positions, range(body.n_layers))
        return body.logits(h)[0].float()


def test_streaming_equals_the_plain_model_when_nothing_is_evicted(engine):
    ids = _ids(150)
    stream = StreamingLLM(engine.body, recent=200, piece=37)  # several prefill pieces, no eviction
    got = torch.stack(list(stream.stream_logits(ids, 60)))
    want = _plain_logits(engine, ids)[59:-1]
    assert (got - want).abs().max() <= 1e-4
    nll, n = stream.score(ids, 60)
    assert n == 90
    assert nll == pytest.approx(float(F.cross_entropy(want, torch.tensor(ids[60:]), reduction="sum")), rel=1e-5)

    prompt = ids[:40]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    plain = [
        e.token_id
        for e in engine.decoder.generate(prompt, None, params, engine.tokenizer.decode)
        if isinstance(e, TokenDelta)
    ]
    streamed = stream.generate(prompt, params, engine.decoder.eos_ids, engine.decode_text)
    assert [e.token_id for e in streamed if isinstance(e, TokenDelta)] == plain


def test_eviction_keeps_exactly_the_sinks_and_the_most_recent_tokens(engine):
    stream = StreamingLLM(engine.body, recent=16, sinks=4, piece=5)
    cache = stream.new_cache()
    stream.feed(cache, _ids(15))
    assert cache.cached_tokens == list(range(15))  # under capacity: nothing evicted
    stream.feed(cache, _ids(32, seed=1))
    assert cache.cached_tokens == [0, 1, 2, 3, *range(31, 47)]
    stream.feed(cache, [7])
    assert cache.cached_tokens == [0, 1, 2, 3, *range(32, 48)]
    assert cache.length == cache.capacity == 20


def test_keys_are_stored_before_rope_and_read_at_cache_positions(engine):
    body = engine.body
    ids = _ids(41)
    stream = StreamingLLM(body, recent=16, sinks=4, piece=8)
    cache = stream.new_cache()
    stream.feed(cache, ids[:40])
    cache.make_room(1)
    n = cache.length
    kept = cache.cached_tokens
    assert kept == [0, 1, 2, 3, *range(25, 40)]

    # Layer 0's keys depend on the token alone: stored keys must be the raw projections, unrotated.
    attn, norm = body.layers[0].self_attn, body.layers[0].input_layernorm
    with torch.inference_mode():
        raw = attn.k_proj(norm(body.embed(torch.tensor([[ids[i] for i in kept]]))))
    raw = raw.view(1, n, body.n_kv, body.head_dim).transpose(1, 2)
    assert torch.allclose(cache.keys[0, :, :, :n], raw, atol=1e-6)

    def reference(positions: list[int], query_position: int) -> torch.Tensor:
        """The engine's own attention over the kept entries rotated to `positions`."""
        ref = body.new_cache(n + 1)
        cos, sin = body.rope(torch.tensor([positions]))
        ref.keys[:, :, :, :n] = apply_rope(cache.keys[:, 0, :, :n], cos, sin).unsqueeze(1)
        ref.values[:, :, :, :n] = cache.values[:, :, :, :n]
        ref.length = n
        with torch.inference_mode():
            h = body.forward_layers(
                body.embed(torch.tensor([[ids[40]]])), torch.tensor([[query_position]]), range(body.n_layers), ref
            )
            return body.logits(h)[0, -1].float()

    got = body.logits(stream.feed(cache, [ids[40]])).float()
    assert (got - reference(list(range(n)), n)).abs().max() <= 1e-4
    # Document positions give other logits (the sinks sit at another distance), so the check has teeth.
    assert (got - reference(kept, 40)).abs().max() > 1e-3


def test_windows_score_the_same_tokens_at_every_length():
    assert window_starts(1000, [100, 200, 2000], 50, 3) == ([100, 200], [200, 575, 950])
    assert window_starts(1000, [100], 50, 1) == ([100], [950])  # the published protocol: the last W tokens
    assert window_starts(100, [100], 50, 2) == ([], [])


def test_gap_closed_is_the_share_of_the_full_attention_gain():
    assert gap_closed(window_alone=3.0, sharedllm=2.5, full_attention=2.0) == pytest.approx(0.5)
    assert gap_closed(window_alone=3.0, sharedllm=3.2, full_attention=2.0) == pytest.approx(-0.2)  # worse than none
    assert gap_closed(window_alone=2.0, sharedllm=2.5, full_attention=2.0) is None  # no gap to close


def test_code_and_docs_are_scored_as_their_held_out_files_joined_in_name_order(engine, tmp_path):
    fetch(tmp_path, corpora=("pydocs",))
    (document,) = heldout_documents(tmp_path, engine.tokenizer, ["pydocs", "austen"])
    entries = sorted((e for e in read_manifest(tmp_path) if e.split == "heldout"), key=lambda e: e.name)
    assert document.name == "pydocs:held-out pages" and len(entries) > 10
    expected = [load_document_tokens(tmp_path, e.name, engine.tokenizer, "pydocs") for e in entries]
    assert document.tokens.tolist() == [t for tokens in expected for t in tokens.tolist()]
    with pytest.raises(InvalidInput, match="sharedllm data fetch --corpus austen"):
        heldout_documents(tmp_path, engine.tokenizer, ["austen"])


def _run(*argv: str) -> None:
    args = build_parser(argv).parse_args(argv)
    assert args.handler(args) == 0


def test_tree_flags_and_a_trained_adapter_exclude_each_other():
    with pytest.raises(InvalidInput, match="carries its own config"):
        _run("eval", "ppl", "--adapter", "adapter.safetensors", "--depth", "2")


def test_eval_commands_end_to_end(tiny_model_dir, data_dir, tmp_path, capsys):
    shared = ["--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--streaming-recent", "128", *TREE]
    _run(
        "eval",
        "ppl",
        *shared,
        "--lengths",
        "256",
        "1024",
        "--windows",
        "2",
        "--scored-tokens",
        "32",
        "--decoder-tokens",
        "64",
        "--json",
        str(tmp_path / "ppl.json"),
        "--plot",
        str(tmp_path / "ppl.png"),
    )
    report = json.loads((tmp_path / "ppl.json").read_text())
    assert report["setup"]["tree_config"]["chunk_size"] == 64 and report["setup"]["adapter"] == "untrained"
    short, long = report["lengths"]
    assert (short["length"], short["documents"], short["windows"]) == (256, 1, 2)
    assert set(short["methods"]) == {"sharedllm", "evidence", "tree", "window", "full", "truncation", "streaming"}
    assert short["methods"]["full"]["same_as"] == "truncation"  # 256 + 32 fits the 1,024-token window
    assert long["methods"]["full"]["ppl"] is None  # 1,024 + 32 does not
    assert long["methods"]["truncation"]["ppl"] < float("inf")
    # An untrained adapter leaves the model unchanged, and every length scores the same tokens;
    # the excerpts (ranked for the segment, 512 tokens by default) change what the window holds.
    assert short["methods"]["sharedllm"]["ppl"] == pytest.approx(short["methods"]["evidence"]["ppl"], rel=1e-5)
    assert short["methods"]["tree"]["ppl"] == pytest.approx(short["methods"]["window"]["ppl"], rel=1e-5)
    assert short["methods"]["evidence"]["ppl"] != pytest.approx(short["methods"]["window"]["ppl"], rel=1e-5)
    assert short["methods"]["window"]["ppl"] == pytest.approx(long["methods"]["window"]["ppl"], rel=1e-5)
    # The gap closed exists only where full attention does (and gains), overall and per document (one here);
    # with the untrained adapter what sharedllm recovers is the excerpts' share alone.
    nll = {m: short["methods"][m]["mean_nll"] for m in ("window", "evidence", "full")}
    gains = nll["window"] > nll["full"]
    assert (short["gap_closed"] is not None) == gains
    expected = (nll["window"] - nll["evidence"]) / (nll["window"] - nll["full"]) if gains else None
    assert not gains or short["gap_closed"] == pytest.approx(expected, abs=1e-4)
    assert long["gap_closed"] is None
    (name,) = report["protocol"]["documents"]
    assert list(short["per_document"]) == [name] and short["per_document"][name]["methods"] == short["methods"]
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "=trunc" in table and "n/a" in table and "untrained" in table

    _run(
        "eval",
        "needle",
        *shared,
        "--lengths",
        "256",
        "1000",
        "--depths",
        "0",
        "1",
        "--max-new-tokens",
        "4",
        "--methods",
        "sharedllm",
        "full",
        "truncation",
        "streaming",
        "--json",
        str(tmp_path / "needle.json"),
        "--plot",
        str(tmp_path / "needle.png"),
    )
    report = json.loads((tmp_path / "needle.json").read_text())
    assert len(report["cells"]) == 2 * 4 * 2 * 2  # tasks x methods x lengths x depths
    full = {c["length"]: c["accuracy"] for c in report["cells"] if c["method"] == "full"}
    assert full[1000] is None and full[256] is not None  # full only where the document fits the window
    assert all(isinstance(s["output"], str) and s["expected"] for s in report["samples"])
    for method in ("sharedllm", "full", "truncation", "streaming"):
        assert (tmp_path / f"needle-{method}.png").read_bytes()[:4] == b"\x89PNG"


def test_ruler_tasks_plant_what_they_ask_for(engine, data_dir):
    from sharedllm.common.data.synthetic import Filler, needle_haystack_text
    from sharedllm.common.evaluation.heldout import heldout_book_text
    from sharedllm.common.evaluation.ruler import TASKS

    fillers = {
        "noise": Filler(engine.tokenizer),
        "prose": Filler(engine.tokenizer, heldout_book_text(data_dir)[1]),
        "needles": Filler(engine.tokenizer, needle_haystack_text(0)),
    }
    expected_answers = {"multivalue": 4, "multiquery": 4, "variables": 5}
    for name, (haystack, build) in TASKS.items():
        task = build(fillers[haystack], 2048, 0.3, 7)
        answers = task.metadata["answers"]
        assert len(answers) == expected_answers.get(name, 1), name
        assert all(a in task.document for a in answers), name
        assert abs(task.metadata["tokens"] - 2048) <= 2048 * 0.02, name
        assert task.metadata["answer_prefix"] and task.question, name
        if haystack == "needles":  # every sentence is a needle, and only the asked key is the task's
            assert task.document.count("special magic number") > 50
        if name == "multikey_prose":
            assert sum(not f["queried"] for f in task.metadata["facts"]) == 3
    chain = TASKS["variables"][1](fillers["noise"], 2048, 0.2, 3)
    positions = [chain.document.index(f"VAR {n} =") for n in chain.metadata["answers"]]
    assert positions == sorted(positions)  # each assignment follows the one it copies
    value = chain.question.split("value ")[1].split()[0]
    assert f"VAR {chain.metadata['answers'][0]} = {value}." in chain.document


def test_the_bm25_method_reads_no_tree_and_ranks_plainly(engine, monkeypatch):
    from sharedllm.common.data.synthetic import Filler, needle_task
    from sharedllm.common.engine.params import EvidenceSettings
    from sharedllm.common.evaluation.methods import PLAIN_PASSAGE_TOKENS
    from sharedllm.common.evaluation.needle import Answerer

    plans = []
    plan = engine.plan

    def spy(source, question, **options):
        plans.append(options)
        return plan(source, question, **options)

    monkeypatch.setattr(engine, "plan", spy)
    answer = Answerer(engine, None, ("sharedllm", "bm25"), 2, EvidenceSettings(tokens=128), True)
    answer(needle_task(Filler(engine.tokenizer), 512, 0.5, 0))
    product, plain = plans
    assert (product["inject"], product["retrieval"]) == (True, True)
    assert (plain["inject"], plain["retrieval"]) == (False, False)  # no tree injected, none ranked with
    assert plain["evidence"].tokens == product["evidence"].tokens == 128
    assert plain["evidence"].passage_tokens == PLAIN_PASSAGE_TOKENS and product["evidence"].passage_tokens == 32
    assert (plain["evidence"].hops, plain["evidence"].neighbours_of, plain["evidence"].tree_weight) == (0, 0, 0.0)


def test_ruler_score_is_the_share_of_expected_strings():
    from sharedllm.common.evaluation.ruler import score

    assert score(["123", "456"], "It is 123 and then 4567.") == 1.0
    assert score(["QWERT", "ABCDE"], "qwert, zzz") == 0.5
    assert score(["1"], "") == 0.0


def test_eval_ruler_end_to_end(tiny_model_dir, data_dir, tmp_path, capsys):
    _run(
        "eval",
        "ruler",
        "--model",
        str(tiny_model_dir),
        "--data-dir",
        str(data_dir),
        *TREE,
        "--lengths",
        "512",
        "1536",
        "--per-cell",
        "1",
        "--max-new-tokens",
        "3",
        "--evidence-tokens",
        "128",
        "--methods",
        "sharedllm",
        "evidence",
        "bm25",
        "tree",
        "full",
        "truncation",
        "--json",
        str(tmp_path / "ruler.json"),
        "--plot",
        str(tmp_path / "ruler.png"),
    )
    report = json.loads((tmp_path / "ruler.json").read_text())
    assert len(report["cells"]) == 6 * 7 * 2  # methods x tasks x lengths
    full = {c["length"]: c["score"] for c in report["cells"] if c["method"] == "full"}
    assert full[1536] is None and full[512] is not None
    assert {s["method"] for s in report["samples"]} == {"sharedllm", "evidence", "bm25", "tree", "full", "truncation"}
    at_512 = {s["method"]: s["output"] for s in report["samples"] if s["length"] == 512 and s["task"] == "variables"}
    assert at_512["full"] == at_512["truncation"]  # where the document fits, one base-window run serves both
    assert report["protocol"]["evidence"]["tokens"] == 128
    assert report["protocol"]["bm25_evidence"] | {"tokens": 0} == {
        **report["protocol"]["evidence"],
        "tokens": 0,
        "passage_tokens": 96,
        "tree_weight": 0.0,
        "hops": 0,
        "neighbours_of": 0,
        "min_score": 0.0,
    }
    assert (tmp_path / "ruler.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "RULER-style mean over 7 tasks" in table and "variables" in table


def test_the_shipped_prose_questions_are_well_formed():
    from sharedllm.common.evaluation import qa

    sets = [qa.load_questions(path) for path in qa.shipped_question_files()]
    assert sum(len(s.questions) for s in sets) >= 40
    assert {s.kind for s in sets} == set(qa.KINDS)
    for spec in sets:
        for q in spec.questions:
            assert q.answers and all(a.lower() in q.source.lower() for a in q.answers), q.question


def test_prose_scoring_rules():
    from sharedllm.common.evaluation import qa

    assert qa.is_right(("Rivers Street",), "She lodged in rivers street.")
    assert not qa.is_right(("Rivers Street",), "She lodged in Gay Street.")
    assert qa.loops("the cat sat down and the cat sat down")
    assert not qa.loops("the cat sat down and the dog sat down")
    document = "x" * 2000 + "The answer sentence." + "y" * 2000
    passage = qa.anchor_passage(document, "The answer sentence.")
    assert "The answer sentence." in passage.text and len(passage.text) == qa.ANCHOR_CHARS
