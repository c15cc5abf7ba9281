"""The tasks of a batch job: compress, summarise and answer one document each.

Every task is idempotent: it reads the document and what earlier deliveries saved from the job
record, skips what is done, and records progress as it goes. So a redelivered task (its worker
died) resumes rather than repeats, and a finished document is never processed again.
Failures of one document are recorded on it and end its chain; the job goes on. Only a
transient failure (a service or the store unavailable or full) is retried, with backoff.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from sharedllm.common.batch import stages
from sharedllm.common.batch.app import BatchApp
from sharedllm.common.batch.backends import Backend, DocumentFailed, Transient
from sharedllm.common.batch.jobs import TERMINAL, DocumentStatus, JobSpec, JobStore
from sharedllm.common.batch.leases import Reaper
from sharedllm.common.engine.params import SamplingParams
from sharedllm.common.engine.results import run_to_end
from sharedllm.common.summaries.pipeline import summarize as summarize_document

log = logging.getLogger(__name__)
ACROSS_WAIT_S = 5.0  # how soon a question across a job's documents looks again while they are compressed
_backend_factory: Callable[[], Backend] | None = None
_backend: Backend | None = None


class Cancelled(Exception):
    """The job was cancelled while this document was being worked on."""


def use_backend(factory: Callable[[], Backend]) -> None:
    """Set how this worker process reaches the model (called before the worker starts)."""
    global _backend_factory, _backend
    _backend_factory, _backend = factory, None


def backend() -> Backend:
    global _backend
    if _backend is None:
        if _backend_factory is None:
            raise RuntimeError("no backend: start workers with `sharedllm worker`")
        _backend = _backend_factory()
    return _backend


@functools.cache
def _job_store(broker_url: str) -> JobStore:
    return JobStore.from_url(broker_url)


def _run(task: Task, job_id: str, index: int, stage: str, work: Callable[[JobStore, DocumentStatus], None]) -> None:
    """One stage of one document, with the job's bookkeeping around it."""
    settings = task.app.settings
    store = _job_store(settings.broker_url)  # this process's (one connection pool, not one per task)
    owner = task.request.id or "eager"
    name = task.name.rsplit(".", 1)[-1]
    if store.stage_done(job_id, index, name):
        return  # a late copy of a stage that finished and sent the next one: nothing to do
    if store.leased_elsewhere(job_id, index, name, owner):
        return  # the dead worker's message, redelivered late: the document was handed on (leases.py)
    doc = store.begin(job_id, index, stage)
    if doc is None:
        return  # finished already (a redelivery after the work was done), or cancelled
    deliveries = store.count_delivery(job_id, index, stage, task.request.retries)
    if deliveries > settings.max_deliveries:
        store.finish(job_id, index, "failed", error=f"{stage} was delivered {deliveries - 1} times without finishing")
        return
    started = time.perf_counter()
    retry = None
    # An exception that escapes this block (the store or the broker gone for longer than the job
    # store's retries, a bug) leaves the lease to lapse, so a reaper sends the document again and
    # the next delivery resumes it; the outcomes handled here release the lease.
    with store.lease(job_id, index, name, owner, settings.lease_s) as lease:
        try:
            work(store, doc)
            if lease.lost.is_set():
                log.warning("document %d of job %s: its lease was reaped; the other delivery goes on", index, job_id)
                return
            after = stages.following(name)
            if after is not None:  # inside the lease: a send that fails lets it lapse (stages.py)
                stages.send(task.app, job_id, index, after)
                store.mark_stage_done(job_id, index, name)
        except Transient as exc:
            if task.request.retries >= settings.max_retries:
                store.finish(
                    job_id, index, "failed", error=f"{stage}: gave up after {settings.max_retries} retries: {exc}"
                )
            else:
                log.warning("document %d of job %s: %s; retrying", index, job_id, exc)
                # Sent while the lease is held: a send that fails lets the lease lapse instead.
                retry = task.retry(exc=exc, countdown=min(2 ** (task.request.retries + 1), 60), throw=False)
        except DocumentFailed as exc:
            store.finish(job_id, index, "failed", error=f"{stage}: {exc}")
        except Cancelled:
            store.finish(job_id, index, "cancelled", error="the job was cancelled")
        except SoftTimeLimitExceeded:
            store.finish(job_id, index, "failed", error=f"{stage} took longer than {settings.soft_time_limit_s} s")
        finally:
            store.add_timing(job_id, index, f"{stage}_s", time.perf_counter() - started)
    if retry is not None:
        raise retry  # the retry is sent; this tells Celery the task ended in RETRY


def compress(self: Task, job_id: str, index: int) -> None:
    def work(store: JobStore, doc: DocumentStatus) -> None:
        stored = backend().ensure_context(store.text(job_id, index))
        store.update(
            job_id, index, context_id=stored.context_id, reused_context=stored.reused, document_tokens=stored.tokens
        )

    _run(self, job_id, index, "compressing", work)


def summarize(self: Task, job_id: str, index: int) -> None:
    """The document's summary by the one pipeline (`sharedllm summarize` makes the same one)."""

    def work(store: JobStore, doc: DocumentStatus) -> None:
        spec = store.spec(job_id)
        if not spec.summarize or store.partial(job_id, index, "summary"):
            return
        settings = spec.summary_settings()
        write = None
        if settings.rewrite:
            context_id = _context_of(doc)

            def write(prompt: str, params: SamplingParams) -> str:
                return backend().generate(context_id, prompt, params, evidence_tokens=0)

        def saved(outputs: list[str]) -> None:
            store.save_partial(job_id, index, "summary_calls", outputs)
            store.update(job_id, index, progress=len(outputs))
            if store.cancelled(job_id):
                raise Cancelled

        with backend().failures():  # unavailable: retry; refused (a call, or the pipeline): fail at once
            summary = summarize_document(
                store.text(job_id, index),
                write,
                settings,
                done=store.partial(job_id, index, "summary_calls"),
                on_call=saved,
            )
        store.save_partial(job_id, index, "summary", [summary.to_dict()])

    _run(self, job_id, index, "summarizing", work)


def answer(self: Task, job_id: str, index: int) -> None:
    """Answer the job's questions, then record the document's result: the last stage."""

    def work(store: JobStore, doc: DocumentStatus) -> None:
        spec = store.spec(job_id)
        context_id = _context_of(doc)
        answers = store.partial(job_id, index, "answers")
        questions = () if spec.across else spec.questions  # asked across all documents instead
        for question in questions[len(answers) :]:
            if store.cancelled(job_id):
                raise Cancelled
            answers.append(backend().generate(context_id, question, _answer_params(spec)).strip())
            store.save_partial(job_id, index, "answers", answers)
            store.update(job_id, index, progress=len(answers), total=len(questions))
        summary = store.partial(job_id, index, "summary")
        result = {
            "context_id": context_id,
            "reused_context": doc.reused_context,
            "document_tokens": doc.document_tokens,
            "summary": summary[0]["text"] if summary else None,
            "summary_details": summary[0] if summary else None,
            "answers": [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)],
        }
        store.finish(job_id, index, "done", result=result)

    _run(self, job_id, index, "answering", work)


def _answer_params(spec: JobSpec) -> SamplingParams:
    """As `sharedllm ask` answers: one sentence, resting on the document as the job asks."""
    return SamplingParams(max_new_tokens=spec.max_new_tokens, seed=spec.seed, grounding=spec.grounding)


def across(self: Task, job_id: str, index: int) -> None:
    """Answer the job's questions once across all its documents (`batch submit --across`), once
    every document is compressed or has failed; the entry after the documents records them.

    Until then it sends itself again ACROSS_WAIT_S later rather than waiting in a worker slot (a
    worker of one slot would wait for itself) or retrying (waiting is not a failure). The poll
    that sends the next one hands it the watch (JobStore.pass_watch), whose lease a dead worker
    lets lapse, so a reaper sends the task again; a poll that finds another holding the watch
    ends, so one chain of polls goes on.
    """
    store = _job_store(self.app.settings.broker_url)
    me = self.request.id or "eager"
    if store.document(job_id, index).state in TERMINAL or store.leased_elsewhere(job_id, index, stages.ACROSS, me):
        return
    if store.documents_waited_for(job_id, index) and not store.cancelled(job_id):
        successor = uuid.uuid4().hex
        if store.pass_watch(job_id, index, me, successor, self.app.settings.lease_s):
            stages.send(self.app, job_id, index, stages.ACROSS, countdown=ACROSS_WAIT_S, task_id=successor)
        return
    store.end_watch(job_id, index)

    def work(store: JobStore, entry: DocumentStatus) -> None:
        spec = store.spec(job_id)
        docs = [store.document(job_id, i) for i in range(index)]
        compressed = [d for d in docs if d.context_id is not None]
        if not compressed:
            raise DocumentFailed("no document of the job was compressed, so there is nothing to ask across")
        names: dict[str, list[str]] = {}  # documents of the same text share one context
        for d in compressed:
            names.setdefault(d.context_id, []).append(d.name)
        context_ids = list(names)
        answers = store.partial(job_id, index, "answers")
        for question in spec.questions[len(answers) :]:
            if store.cancelled(job_id):
                raise Cancelled
            with backend().failures():
                finished = run_to_end(backend().answer(context_ids, question, _answer_params(spec)))
            cited = [c.context_id for c in finished.citations] or [
                p.context_id for p in sorted(finished.evidence, key=lambda p: -p.score)[:1]
            ]
            sources = [name for c in dict.fromkeys(cited) for name in names.get(c, [])]
            answers.append({"question": question, "answer": finished.text.strip(), "sources": sources})
            store.save_partial(job_id, index, "answers", answers)
            store.update(job_id, index, progress=len(answers), total=len(spec.questions))
        result = {
            "documents": [d.name for d in compressed],
            "context_ids": context_ids,
            "skipped": [d.name for d in docs if d.context_id is None],  # failed or cancelled before compression
            "answers": answers,
        }
        store.finish(job_id, index, "done", result=result)

    _run(self, job_id, index, "answering", work)


def _context_of(doc: DocumentStatus) -> str:
    if doc.context_id is None:
        raise DocumentFailed("the document has no stored context (its compression did not finish)")
    return doc.context_id


def start_reaper(app: BatchApp) -> Reaper:
    """Run this worker's lease reaper: a document whose worker died is sent again (leases.py)."""

    def resend(job_id: str, index: int, task: str) -> None:
        stages.send(app, job_id, index, task)

    return Reaper(_job_store(app.settings.broker_url).client, resend).start()


def register(app: BatchApp) -> None:
    """Make `app` run the batch tasks (a worker's app; senders send them by name)."""
    for work in (compress, summarize, answer, across):
        # shared=False: only this app runs them (another app in the process has no batch settings).
        app.task(name=stages.task_name(work.__name__), bind=True, shared=False)(work)
