"""Leases on a document's work, and the reaper that hands a dead worker's document to another.

Why: Celery over Redis redelivers a task whose worker died only after the broker's visibility
timeout, which must outlast the longest task (two hours by default) or a live task would be
handed out twice. A worker killed in the middle of a document (an OOM kill, a lost node, an
eviction) would stall that document for two hours. So a task that works on a document holds a
lease on it, renewed by a heartbeat thread every third of the lease; every worker runs a reaper
that, finding a lease expired, removes it (one reaper wins the removal) and sends the document's
remaining tasks again. The new task resumes from the partial work the job record holds; the dead
worker's original message, redelivered hours later, finds the document finished (or leased by
another) and does nothing; and a document reaches its final state once (jobs.py), so a worker
that was only slow, not dead, cannot finish it twice.

One sorted set holds every lease: member "{job}:{index}:{task}:{owner}", score the expiry (unix
seconds). The owner is the task's delivery id, so a renewal by a worker whose lease was reaped
finds its member gone and knows it has lost the document.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

LEASES_KEY = "sharedllm:batch:leases"
DEFAULT_LEASE_S = 30.0  # a dead worker's document is handed on within this, plus one reaper period
REAPER_PERIOD_S = 5.0


@dataclass(frozen=True)
class LeaseName:
    job_id: str
    index: int
    task: str  # the task's short name: compress, summarize, answer
    owner: str

    @property
    def member(self) -> str:
        return f"{self.job_id}:{self.index}:{self.task}:{self.owner}"

    @classmethod
    def parse(cls, member: str) -> LeaseName:
        job_id, index, task, owner = member.split(":", 3)
        return cls(job_id, int(index), task, owner)


class Lease:
    """Held while a task works on a document: taken on entry, renewed in a thread, released on exit."""

    def __init__(self, client: redis.Redis, name: LeaseName, doc_key: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.client, self.name, self.doc_key, self.lease_s = client, name, doc_key, lease_s
        self.lost = threading.Event()  # the lease was reaped: another worker has the document now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {name.member}", daemon=True)

    def __enter__(self) -> Lease:
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(LEASES_KEY, {self.name.member: time.time() + self.lease_s})
        pipe.hset(self.doc_key, "lease", self.name.member)
        pipe.execute()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        """Released when the work ended as its task decided; kept (to lapse, and the reaper to send
        the document again) when an exception escaped it: the store or broker gone, a bug."""
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self.client.zrem(LEASES_KEY, self.name.member)
        else:
            log.warning("lease %s kept to lapse: the work ended with %s", self.name.member, exc_type.__name__)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                # XX: renew only a lease that is still there; CH: count it as changed.
                renewed = self.client.zadd(LEASES_KEY, {self.name.member: time.time() + self.lease_s}, xx=True, ch=True)
            except redis.RedisError as exc:  # the store is away: the lease may lapse; keep trying
                log.warning("lease %s not renewed: %s", self.name.member, exc)
                continue
            if not renewed:
                log.warning("lease %s was reaped: another worker has the document", self.name.member)
                self.lost.set()
                return


def held_by_another(client: redis.Redis, doc_key: str, owner: str) -> bool:
    """Whether a live lease of another owner covers the document (its work is going on elsewhere)."""
    member = client.hget(doc_key, "lease")
    if member is None or LeaseName.parse(member.decode()).owner == owner:
        return False
    expiry = client.zscore(LEASES_KEY, member)
    return expiry is not None and expiry > time.time()


class Reaper:
    """Hands on the documents whose leases expired: `resend(job_id, index, task)` sends that task
    and the ones after it again. Runs in a daemon thread of every worker; of several reapers that
    see one expired lease, the one whose removal succeeds resends it."""

    def __init__(
        self,
        client: redis.Redis,
        resend: Callable[[str, int, str], None],
        period_s: float = REAPER_PERIOD_S,
    ) -> None:
        self.client, self.resend, self.period_s = client, resend, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reap_once(self) -> list[LeaseName]:
        """Resend every document whose lease has expired; the ones this reaper resent."""
        reaped = []
        for member in self.client.zrangebyscore(LEASES_KEY, "-inf", time.time()):
            if self.client.zrem(LEASES_KEY, member) != 1:
                continue  # another reaper took it, or its worker renewed or released it just now
            name = LeaseName.parse(member.decode())
            log.warning(
                "document %d of job %s: its worker stopped (%s); sending it again", name.index, name.job_id, name.task
            )
            self.resend(name.job_id, name.index, name.task)
            reaped.append(name)
        return reaped

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.reap_once()
            except redis.RedisError as exc:
                log.warning("lease reaper: %s", exc)
