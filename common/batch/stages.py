"""The tasks of one document, in order, and how the next one is sent.

Each task sends the document's next task itself, once its own work is recorded, rather than
leaving it to a Celery chain: a chain's next link is published by Celery after the task returns,
outside the task's lease, and a broker that is restarting at that moment would lose it with
nothing left to notice. Sent from inside the lease, a failed send leaves the lease to lapse, and
the reaper sends the document's task again (leases.py).
"""

from __future__ import annotations

from celery import Celery

TASKS = ("compress", "summarize", "answer")
# A job asked across its documents has one more entry, whose one task answers the questions once
# every document is compressed (it sends itself again, a little later, until then).
ACROSS = "across"


def task_name(task: str) -> str:
    if task not in (*TASKS, ACROSS):
        raise ValueError(f"no batch task {task!r}")
    return f"sharedllm.batch.{task}"


def following(task: str) -> str | None:
    """The task after `task`, None after the last (and after `across`, which stands alone)."""
    if task == ACROSS:
        return None
    position = TASKS.index(task)
    return TASKS[position + 1] if position + 1 < len(TASKS) else None


def send(
    app: Celery,
    job_id: str,
    index: int,
    task: str = TASKS[0],
    *,
    countdown: float | None = None,
    task_id: str | None = None,
) -> None:
    """Send the entry's `task` (which sends the ones after it), now or after `countdown` seconds,
    under `task_id` if given (else Celery picks one)."""
    app.send_task(task_name(task), (job_id, index), countdown=countdown, task_id=task_id)
