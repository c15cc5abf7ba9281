"""Batch jobs on Celery, against a real redis-server, real worker processes and real gRPC services.

The worker processes run `sharedllm worker` exactly as a user starts it, on the tiny model, with
short time limits and visibility timeouts so that a killed worker's task comes back in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from grpc_stack import SERVING, EventLoopThread, InProcessServer, server_config, wait_for_health
from processes import stop_all

from sharedllm.cli import main
from sharedllm.common.batch.client import BatchClient, read_documents
from sharedllm.common.batch.jobs import DocumentInput, JobNotFound, JobSpec, JobStore
from sharedllm.common.batch.leases import DEFAULT_LEASE_S as LEASE_S
from sharedllm.common.errors import InvalidInput
from sharedllm.common.summaries.support import supported
from sharedllm.compressor_service.server import SPEC as COMPRESSOR
from sharedllm.decoder_service.server import SPEC as DECODER

ROOT = Path(__file__).resolve().parents[1]
# Summaries joined by the model, so that its calls run through the worker's backend too.
SPEC = JobSpec(instruction=None, questions=("Who is Naomi?",), max_new_tokens=6, seed=3, summary_words=60, rewrite=True)
# Summaries of many model calls each (groups of at most 500 characters, then the whole).
MANY_CALLS = dataclasses.replace(SPEC, summary_words=120, call_chars=500)
PARAGRAPH = (
    "Naomi went with Ruth to Bethlehem in the days when the judges ruled. Boaz saw Ruth in the field "
    "and spoke kindly to her. The elders sat at the gate and the women praised the child. "
)


def document(n: int, paragraphs: int = 3) -> str:
    return "\n\n".join(f"Part {n}.{p}. " + PARAGRAPH * 2 for p in range(paragraphs))


def varied_document(n: int, sentences: int = 80) -> str:
    """Sentences that all differ, so that a summary of them takes several model calls."""
    syllables = ("ba", "ko", "ri", "del", "mu", "sa", "ten", "vo")
    deeds = ("gleaned barley", "crossed the river", "bought a field", "mended a net", "sold oil", "fed the flock")
    places = ("Bethlehem", "Moab", "Shiloh", "Hebron", "Gilgal")

    def name(k: int) -> str:
        return (syllables[k % 8] + syllables[k // 8 % 8] + "n").capitalize()

    return "\n\n".join(
        f"In year {n + i}, {name(i)} {deeds[i % 6]} near {places[i % 5]} for {name(i + 29)}." for i in range(sentences)
    )


@pytest.fixture
def docs(tmp_path) -> list[Path]:
    paths = []
    for i in range(3):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(document(i), encoding="utf-8")
        paths.append(path)
    (tmp_path / "binary.dat").write_bytes(b"\x00\x01\x02 not text")
    return [*paths, tmp_path / "binary.dat"]


def varied_documents(tmp_path: Path, first: int) -> list[Path]:
    """Three files of varied_document, numbered from `first`."""
    paths = [tmp_path / f"long{i}.txt" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_text(varied_document(first + i), encoding="utf-8")
    return paths


def wait_for_a_summary_under_way(client: BatchClient, job_id: str, log: Path) -> None:
    """Until some document's summary has made at least one model call."""
    deadline = time.monotonic() + 120
    while not any(d.state == "summarizing" and d.progress >= 1 for d in client.status(job_id).documents):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)


@contextmanager
def worker(
    broker: str, log: Path, *mode: str, visibility_s: int | None = 60, limit_s: int = 20
) -> Iterator[subprocess.Popen]:
    """`sharedllm worker` in its own process; stopped (or found killed) at the end. visibility_s
    None: the worker's default limits and visibility timeout (two hours), as a user starts it."""
    command = [sys.executable, "-m", "sharedllm", "worker", *mode, "--broker-url", broker, "--torch-threads", "1"]
    if visibility_s is not None:
        command += ["--soft-time-limit-s", str(limit_s - 1), "--time-limit-s", str(limit_s)]
        command += ["--visibility-timeout-s", str(visibility_s)]
    command += ["--log-level", "WARNING"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("a") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield process
    finally:
        stop_all([process])


def embedded(tiny_model_dir: Path, tiny_adapter: Path) -> tuple[str, ...]:
    return ("--embedded", "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter))


def wait_for(client: BatchClient, job_id: str, log: Path, timeout: float = 240.0, states=("done", "done_with_errors")):
    deadline = time.monotonic() + timeout
    while (status := client.status(job_id)).state not in states:
        if time.monotonic() > deadline:
            documents = [(d.state, d.progress, d.attempts, d.error) for d in status.documents]
            raise AssertionError(
                f"job {status.state} after {timeout} s; documents {documents}; worker log:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.2)
    return status


def comparable(results: list[dict]) -> list[tuple]:
    return [(r["state"], r.get("summary"), r.get("summary_details"), r.get("answers")) for r in results]


# ---- units -------------------------------------------------------------------------------


def test_documents_that_cannot_be_processed_fail_alone(tmp_path):
    (tmp_path / "ok.txt").write_text("Some text.")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "big.txt").write_text("x" * 300)
    read = {Path(d.name).name: d for d in read_documents([tmp_path, tmp_path / "missing.txt"], max_bytes=200)}
    assert read["ok.txt"].text == "Some text." and read["ok.txt"].error is None
    assert read["empty.txt"].error == "is empty"
    assert "not UTF-8" in read["latin1.txt"].error
    assert "limit is 200" in read["big.txt"].error
    assert "cannot read" in read["missing.txt"].error


def test_a_document_finishes_once(redis_server):
    store = JobStore.from_url(redis_server.url)
    documents = [DocumentInput("a", "text"), DocumentInput("b", "text"), DocumentInput("c", None, "empty")]
    job = store.create(SPEC, documents)
    assert store.status(job).finished == 1  # the broken one failed at submission
    assert store.finish(job, 0, "done", result={"summary": "x"}) is True
    assert store.finish(job, 0, "done", result={"summary": "y"}) is False  # a redelivered task got there too
    assert store.status(job).state == "queued"
    store.finish(job, 1, "failed", error="boom")
    status = store.status(job)
    assert status.state == "done_with_errors" and status.finished == 3
    assert status.documents[0].result == {"summary": "x"}
    with pytest.raises(JobNotFound):
        store.status("no-such-job")
    with pytest.raises(InvalidInput, match="needs at least one question"):
        JobSpec(None, (), summarize=False)
    with pytest.raises(InvalidInput, match="grounding must be one of quote, facts, off"):
        JobSpec(None, ("Who?",), grounding="sometimes")
    free = store.create(dataclasses.replace(SPEC, grounding="off"), documents[:1])
    assert store.spec(free).grounding == "off" and store.spec(job).grounding == "quote"


# ---- real workers ------------------------------------------------------------------------


def test_jobs_complete_embedded_and_over_grpc_with_the_same_results(
    tiny_model_dir, tiny_adapter, make_redis_server, docs, tmp_path, capsys
):
    redis = make_redis_server()
    client = BatchClient(redis.url)
    log = tmp_path / "worker.log"
    with worker(redis.url, log, *embedded(tiny_model_dir, tiny_adapter)):
        job = client.submit(read_documents(docs), SPEC)
        status = wait_for(client, job, log)
    assert status.state == "done_with_errors"  # the binary file failed alone
    results = client.results(job)
    assert [r["state"] for r in results] == ["done", "done", "done", "failed"]
    assert "binary" in results[3]["error"]
    for path, result in zip(docs, results[:3], strict=False):
        details = result["summary_details"]
        assert result["summary"] == details["text"] and details["words"] <= SPEC.summary_words
        assert details["model_calls"] == 1 and result["answers"][0]["question"] == SPEC.questions[0]
        text = path.read_text()
        assert all(supported(s["text"], text, [tuple(span) for span in s["spans"]]) for s in details["sentences"][1:])

        # Answers are grounded as `ask`'s are: by default a quote of the document.
        assert " ".join(result["answers"][0]["answer"].split()) in " ".join(path.read_text().split())
        assert result["reused_context"] is False and result["document_tokens"] > 0

    # `sharedllm summarize` with the same settings makes the same summary.
    model = ("--model", str(tiny_model_dir), "--adapter", str(tiny_adapter))
    assert main(["summarize", str(docs[0]), "--words", str(SPEC.summary_words), "--rewrite", *model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == results[0]["summary"]

    # The same documents through the gRPC services and a worker that only sends requests.
    loop = EventLoopThread()
    try:
        flags = ("--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", redis.url)
        config = server_config(*flags)
        with InProcessServer(loop, COMPRESSOR, config) as c, InProcessServer(loop, DECODER, config) as d:
            for server in (c, d):
                wait_for_health(server.target, SERVING)
            with worker(redis.url, log, "--compressor", c.target, "--decoder", d.target):
                remote_job = client.submit(read_documents(docs), SPEC)
                wait_for(client, remote_job, log)
    finally:
        loop.close()
    assert comparable(client.results(remote_job)) == comparable(results)

    # Three documents at once in one embedded worker: their answers share batched model steps.
    with worker(redis.url, log, *embedded(tiny_model_dir, tiny_adapter), "--documents-in-flight", "3"):
        batched_job = client.submit(read_documents(docs), SPEC)
        wait_for(client, batched_job, log)
    assert comparable(client.results(batched_job)) == comparable(results)


def test_a_killed_worker_loses_nothing_and_repeats_nothing(tiny_model_dir, tiny_adapter, make_redis_server, tmp_path):
    redis = make_redis_server()
    client = BatchClient(redis.url)
    paths, log = varied_documents(tmp_path, 10), tmp_path / "worker.log"
    mode = embedded(tiny_model_dir, tiny_adapter)
    # The workers' defaults: a two-hour visibility timeout, so only the lease brings the document back.
    with worker(redis.url, log, *mode, visibility_s=None) as first:
        job = client.submit(read_documents(paths), MANY_CALLS)
        wait_for_a_summary_under_way(client, job, log)
        first.send_signal(signal.SIGKILL)  # in the middle of a document's summary
        first.wait(10)
        killed = time.monotonic()
    interrupted = next(d for d in client.status(job).documents if d.state == "summarizing")
    with worker(redis.url, log, *mode, visibility_s=None):
        while client.status(job).documents[interrupted.index].attempts == interrupted.attempts:
            assert time.monotonic() - killed < LEASE_S + 30, log.read_text()[-3000:]
            time.sleep(0.2)
        resumed_after = time.monotonic() - killed
        status = wait_for(client, job, log)
    print(f"\nthe killed worker's document was handed on after {resumed_after:.1f} s")
    assert resumed_after < 60  # the bound; the lease is 30 s and the reapers look every 5 s
    assert status.state == "done" and status.finished == 3
    again = status.documents[interrupted.index]
    assert again.attempts > interrupted.attempts  # its work was handed on, and resumed

    # Every document once, and as an uninterrupted run makes it.
    with worker(redis.url, log, *mode):
        fresh = client.submit(read_documents(paths), MANY_CALLS)
        wait_for(client, fresh, log)
    assert comparable(client.results(job)) == comparable(client.results(fresh))
    assert all(r["summary_details"]["model_calls"] > 2 for r in client.results(fresh))
    assert all(r["reused_context"] for r in client.results(fresh))  # resubmitted: nothing compressed again


def test_cancel_stops_what_is_left_and_resubmitting_reuses_contexts(
    tiny_model_dir, tiny_adapter, make_redis_server, docs, tmp_path, capsys
):
    redis = make_redis_server()
    client = BatchClient(redis.url)
    readable = docs[:3]
    job = client.submit(read_documents(readable), SPEC)  # no worker yet: everything waits
    assert main(["batch", "cancel", job, "--broker-url", redis.url, "--json"]) == 0
    cancelled = json.loads(capsys.readouterr().out)
    assert cancelled["state"] == "cancelled" and {d["state"] for d in cancelled["documents"]} == {"cancelled"}

    log = tmp_path / "worker.log"
    with worker(redis.url, log, *embedded(tiny_model_dir, tiny_adapter)):
        done = client.submit(read_documents(readable), SPEC)
        wait_for(client, done, log)
        contexts = len(redis.client().keys("sllm:*:manifest"))
        again = client.submit(read_documents(readable), SPEC)
        wait_for(client, again, log)
    assert client.status(job).state == "cancelled"  # its tasks came up after the cancel and did nothing
    assert [r["state"] for r in client.results(job)] == ["cancelled"] * 3
    assert [r["reused_context"] for r in client.results(done)] == [False] * 3
    assert [r["reused_context"] for r in client.results(again)] == [True] * 3
    assert len(redis.client().keys("sllm:*:manifest")) == contexts > 0  # no second copy stored

    assert main(["batch", "results", again, "--broker-url", redis.url, "--out", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["0000-doc0.txt.txt", "0001-doc1.txt.txt", "0002-doc2.txt.txt", "results.json"]


def test_an_unknown_job_is_a_clear_error(redis_server, capsys):
    assert main(["batch", "status", "no-such-job", "--broker-url", redis_server.url]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err


def test_a_broker_restart_in_the_middle_of_a_job_loses_nothing(
    tiny_model_dir, tiny_adapter, make_redis_server, tmp_path
):
    """Redis (the broker, the job record and the contexts) killed and started again with its
    append-only file while a document is being summarised: the job ends, every document once."""
    redis = make_redis_server(appendonly=True)
    client = BatchClient(redis.url)
    paths, log = varied_documents(tmp_path, 40), tmp_path / "worker.log"
    mode = embedded(tiny_model_dir, tiny_adapter)
    with worker(redis.url, log, *mode, visibility_s=None):
        job = client.submit(read_documents(paths), MANY_CALLS)
        wait_for_a_summary_under_way(client, job, log)
        redis.stop(kill=True)  # appendfsync always: every acknowledged write is in the file
        time.sleep(2)
        redis.start()
        status = wait_for(client, job, log, timeout=180)
        assert status.state == "done" and status.finished == 3, [(d.state, d.error) for d in status.documents]
        fresh = client.submit(read_documents(paths), MANY_CALLS)
        wait_for(client, fresh, log)
    with redis.client() as raw:
        assert int(raw.hget(f"sharedllm:batch:{job}", "finished")) == 3  # each document counted once
    assert comparable(client.results(job)) == comparable(client.results(fresh))


def test_a_job_asked_across_its_documents_answers_once_from_the_right_one(
    tiny_model_dir, tiny_adapter, make_redis_server, docs, tmp_path, capsys
):
    """`batch submit --across`: each question is asked once across every compressed document (the
    unreadable one is skipped), the answer names the document it rests on, and the documents keep
    their summaries without per-document answers."""
    with pytest.raises(InvalidInput, match="needs at least one question"):
        JobSpec(instruction=None, questions=(), across=True)
    fact = tmp_path / "ledger.txt"
    fact.write_text("The granary ledger was sealed by Keeper Orvandel in the ninth month.\n", encoding="utf-8")
    redis = make_redis_server()
    client = BatchClient(redis.url)
    log = tmp_path / "worker.log"
    spec = dataclasses.replace(
        SPEC, questions=("Who sealed the granary ledger?",), max_new_tokens=40, rewrite=False, across=True
    )
    with worker(redis.url, log, *embedded(tiny_model_dir, tiny_adapter)):
        job = client.submit(read_documents([*docs, fact]), spec)
        status = wait_for(client, job, log)
    results = client.results(job)
    assert [r["state"] for r in results] == ["done", "done", "done", "failed", "done", "done"]
    assert all(r["answers"] == [] and r["summary"] for r in results[:3])
    across = results[-1]
    assert across["document"] == "(all documents)"
    assert across["documents"] == [str(p) for p in [*docs[:3], fact]] and across["skipped"] == [str(docs[3])]
    (answer,) = across["answers"]
    assert "Orvandel" in answer["answer"] and answer["sources"] == [str(fact)]
    assert status.state == "done_with_errors"  # the binary file failed alone
    assert main(["batch", "results", job, "--broker-url", redis.url]) == 0
    assert f"(from {fact})" in capsys.readouterr().out
