"""The `sharedllm` command line as a user runs it: a subprocess, real files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def sharedllm(
    *args: str, timeout: int = 600, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sharedllm", *args],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "No such file"),
        (b"", "is empty"),
        (b"  \n\t ", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text"),
        (b"text with a NUL \x00 byte", "NUL bytes"),
    ],
)
def test_bad_documents_give_one_line_and_exit_2(tmp_path: Path, content, message):
    path = tmp_path / "doc.txt"
    if content is not None:
        path.write_bytes(content)
    result = sharedllm("ask", str(path), "What?")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.model
def test_limits_give_one_line_errors(tmp_path: Path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The cat sat on the mat. " * 200)
    over = sharedllm("ask", str(doc), "What?", "--max-document-tokens", "100")
    assert over.returncode == 2 and "the limit is 100" in over.stderr and "Traceback" not in over.stderr
    window = sharedllm("ask", str(doc), "What?", "--max-new-tokens", "9000")
    assert window.returncode == 2 and "max_new_tokens" in window.stderr and "Traceback" not in window.stderr


@pytest.mark.model
def test_ask_on_a_document_longer_than_the_window(tmp_path: Path):
    demo = sharedllm("data", "demo", "--data-dir", str(tmp_path), "--path-only")
    assert demo.returncode == 0, demo.stderr
    path = Path(demo.stdout.strip().splitlines()[-1])
    result = sharedllm("ask", str(path), "Who is Naomi?", "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["document_tokens"] > 8192  # longer than the model's window
    assert report["chunks"] >= 8
    assert report["completion_tokens"] >= 1 and report["answer"]
    assert report["compression_ratio"] > 1 and report["stored_bytes"] > 0
    assert report["evidence_tokens"] > 0 and report["evidence"]
    text = path.read_text(encoding="utf-8")
    assert all(text[p["char_start"] : p["char_end"]] == p["text"] for p in report["evidence"])

    shown = sharedllm(
        "ask", str(path), "Who is Naomi?", "--max-new-tokens", "4", "--evidence", "--evidence-tokens", "96"
    )
    assert shown.returncode == 0, shown.stderr
    listing = shown.stdout.split("evidence: ", 1)[1]
    assert int(listing.split(" passages, ")[1].split(" tokens")[0]) <= 96
    assert "[chars " in listing and "Naomi" in listing
    bad = sharedllm("ask", str(path), "Who is Naomi?", "--evidence-tokens", "-5")
    assert bad.returncode == 2 and "evidence_tokens must be >= 0" in bad.stderr and "Traceback" not in bad.stderr


def test_ask_across_several_documents(tmp_path: Path):
    """`ask DOC DOC DOC -q QUESTION`: the answer comes from the document that states it, and each
    excerpt says which file it is from; without -q, three positionals are one clear error."""
    paths = []
    for name, fact in [("a", "The lighthouse keeper is Mara Voss."), ("b", ""), ("c", "The vault code is 5521.")]:
        path = tmp_path / f"{name}.txt"
        filler = f"The {name} ledger lists grain, wool and timber for the winter market. " * 30
        path.write_text(filler + "\n" + fact + "\n" + filler, encoding="utf-8")
        paths.append(str(path))
    result = sharedllm("ask", *paths, "-q", "What is the vault code?", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "5521" in report["answer"]
    ids = {d["context_id"]: d["path"] for d in report["documents"]}
    assert [d["path"] for d in report["documents"]] == paths
    best = max(report["evidence"], key=lambda p: p["score"])
    assert ids[best["context_id"]] == paths[2] and "5521" in best["text"]
    shown = sharedllm("ask", *paths, "-q", "Who is the lighthouse keeper?", "--evidence")
    assert shown.returncode == 0 and "Mara Voss" in shown.stdout and f"{paths[0]}, chars " in shown.stdout
    wrong = sharedllm("ask", *paths)
    assert wrong.returncode == 2 and "documents and -q QUESTION" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_bad_tree_flag_is_one_line_not_a_traceback():
    result = sharedllm("eval", "ppl", "--depth", "0")
    assert result.returncode == 2 and "depth must be in [1, 8]" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_demo_path_is_absolute_in_the_cache_and_leaves_the_working_directory_alone(tmp_path: Path):
    """`make demo` passes the printed path to `ask`: it must not depend on the working directory,
    and running the demo from some folder must not write into that folder."""
    from sharedllm.common.data.corpora import CorpusUnavailable, check_available

    try:
        check_available(("bible",))
    except CorpusUnavailable as exc:
        pytest.skip(str(exc))
    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    result = sharedllm("data", "demo", "--path-only", cwd=work, env={"SHAREDLLM_CACHE_DIR": str(cache)})
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.is_absolute() and path.is_file(), result.stdout
    assert path.is_relative_to(cache.resolve()) and path.read_text(encoding="utf-8").startswith("Ruth\n")
    assert not any(work.iterdir())
    again = sharedllm("data", "demo", "--path-only", cwd=tmp_path, env={"SHAREDLLM_CACHE_DIR": str(cache)})
    assert again.returncode == 0 and Path(again.stdout.strip()) == path  # the same file from another folder
    relative = sharedllm("data", "demo", "--path-only", "--data-dir", "mine", cwd=work)
    assert relative.returncode == 0, relative.stderr
    assert Path(relative.stdout.strip()) == (work / "mine" / "demo" / "ruth-1samuel.txt").resolve()
