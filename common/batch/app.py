"""The Celery application of batch jobs: Redis as broker and result backend, JSON only, and the
settings long model work needs.

Why these settings: a document takes minutes, so a worker takes one task at a time
(prefetch 1) and acknowledges it only when done (late ack), so a worker that dies mid-task
leaves its task to be redelivered after the visibility timeout, which must outlast the longest
task or a live task would be handed out twice. That is hours, so a task also holds a lease on
its document, and a dead worker's document is sent again when the lease lapses (leases.py).
Soft and hard time limits bound a stuck task.
Compression and generation have queues of their own, so workers (and their priorities) can be
split between them. Pickle is never accepted: a message is data, not code.

Apps are built from explicit settings (`BatchApp(settings)`), never from the environment at
import; the entry layer reads flags and variables (`sharedllm worker`, and
`sharedllm.celery_app` for Celery's own tools: `celery --app sharedllm.celery_app flower`).
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from kombu import Exchange, Queue

from sharedllm.common.batch.leases import DEFAULT_LEASE_S
from sharedllm.common.config import ConfigError

COMPRESS_QUEUE = "sharedllm.compress"
GENERATE_QUEUE = "sharedllm.generate"
TASK_QUEUES = {
    "sharedllm.batch.compress": COMPRESS_QUEUE,
    "sharedllm.batch.summarize": GENERATE_QUEUE,
    "sharedllm.batch.answer": GENERATE_QUEUE,
}


@dataclass(frozen=True)
class BatchSettings:
    broker_url: str = "redis://localhost:6379/0"
    soft_time_limit_s: int = 3300  # a task is told to stop (the document fails with the reason)
    time_limit_s: int = 3600  # the task's process is killed
    visibility_timeout_s: int = 7200  # an unacknowledged task is redelivered after this long
    max_retries: int = 8  # of a task that met an unavailable or full service or store
    max_deliveries: int = 3  # of one task without finishing (its worker died each time)
    lease_s: float = DEFAULT_LEASE_S  # a dead worker's document is sent again after this (leases.py)

    def __post_init__(self) -> None:
        if not 0 < self.soft_time_limit_s <= self.time_limit_s < self.visibility_timeout_s:
            raise ConfigError(
                "need 0 < soft time limit <= time limit < visibility timeout, got "
                f"{self.soft_time_limit_s}, {self.time_limit_s}, {self.visibility_timeout_s}"
            )
        if self.max_retries < 0 or self.max_deliveries < 1:
            raise ConfigError("max_retries must be >= 0 and max_deliveries >= 1")
        if not 3 <= self.lease_s < self.visibility_timeout_s:
            raise ConfigError(f"need 3 <= lease < visibility timeout, got {self.lease_s}, {self.visibility_timeout_s}")


class BatchApp(Celery):
    """A Celery app of batch jobs, configured from its settings, which its tasks read back.

    sender=True: an app that only sends tasks (a client's; several brokers may be used in one
    process). It has no result backend: a sender never waits for task results, which would hold
    a subscription per task; progress and results are read from the job record.
    """

    def __init__(self, settings: BatchSettings, *, sender: bool = False) -> None:
        super().__init__("sharedllm-client" if sender else "sharedllm", set_as_current=False)
        self.settings = settings
        self.conf.update(
            broker_url=settings.broker_url,
            result_backend=None if sender else settings.broker_url,
            result_expires=24 * 3600,
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
            broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
            result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
            task_soft_time_limit=settings.soft_time_limit_s,
            task_time_limit=settings.time_limit_s,
            task_queues=tuple(Queue(q, Exchange(q, "direct"), routing_key=q) for q in (COMPRESS_QUEUE, GENERATE_QUEUE)),
            task_routes={name: {"queue": queue} for name, queue in TASK_QUEUES.items()},
            task_default_queue=GENERATE_QUEUE,
            # Task states and events for Flower; a document's progress and results live in jobs.py.
            task_track_started=True,
            worker_send_task_events=True,
            task_send_sent_event=True,
            broker_connection_retry_on_startup=True,
            worker_hijack_root_logger=False,
        )
