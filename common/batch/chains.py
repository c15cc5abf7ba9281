"""The tasks of one document, in order, as a Celery chain: what a job sends for each document,
and what the lease reaper sends again from the task a dead worker left."""

from __future__ import annotations

from celery import Celery, chain

TASKS = ("compress", "summarize", "answer")


def document_chain(app: Celery, job_id: str, index: int, first: str = TASKS[0]) -> chain:
    """The document's tasks from `first` on; each takes only (job_id, index) (immutable)."""
    if first not in TASKS:
        raise ValueError(f"no batch task {first!r}")
    names = TASKS[TASKS.index(first) :]
    return chain(*(app.signature(f"sharedllm.batch.{name}", (job_id, index), immutable=True) for name in names))
