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
from collections.abc import Callable
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

LEASES_KEY = "sharedllm:batch:leases"
# Remove and return the leases due by Redis's own clock, in one step: a lease renewed between a
# read and a removal is never reaped, and hosts' clocks play no part.
_REAP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do redis.call('ZREM', KEYS[1], member) end
return due
"""
REAP_BATCH = 100
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
        pipe.zadd(LEASES_KEY, {self.name.member: redis_now(self.client) + self.lease_s})
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
                expiry = redis_now(self.client) + self.lease_s
                renewed = self.client.zadd(LEASES_KEY, {self.name.member: expiry}, xx=True, ch=True)
            except redis.RedisError as exc:  # the store is away: the lease may lapse; keep trying
                log.warning("lease %s not renewed: %s", self.name.member, exc)
                continue
            if not renewed:
                log.warning("lease %s was reaped: another worker has the document", self.name.member)
                self.lost.set()
                return


def redis_now(client: redis.Redis) -> float:
    """Redis's clock, the one every lease is measured by (hosts' clocks may differ)."""
    seconds, microseconds = client.time()
    return seconds + microseconds / 1e6


def held_by_another(client: redis.Redis, doc_key: str, task: str, owner: str) -> bool:
    """Whether another delivery of the same task holds a live lease on the document (its work is
    going on elsewhere). A lease of the stage before does not count: that task sends this one
    from inside its lease, so this one may start before the other has let go."""
    member = client.hget(doc_key, "lease")
    if member is None:
        return False
    holder = LeaseName.parse(member.decode())
    if holder.task != task or holder.owner == owner:
        return False
    expiry = client.zscore(LEASES_KEY, member)
    return expiry is not None and expiry > redis_now(client)


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
        self._reap = client.register_script(_REAP)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reap_once(self) -> list[LeaseName]:
        """Resend every document whose lease has expired; the ones this reaper resent. A lease
        whose resend fails is put back, due now, for the next pass (or another reaper)."""
        reaped = []
        for member in self._reap(keys=[LEASES_KEY], args=[REAP_BATCH]):
            try:
                name = LeaseName.parse(member.decode())
            except ValueError:
                log.error("lease reaper: dropped a malformed lease %r", member)
                continue
            log.warning(
                "document %d of job %s: its worker stopped (%s); sending it again", name.index, name.job_id, name.task
            )
            try:
                self.resend(name.job_id, name.index, name.task)
            except Exception as exc:  # the broker away: keep the lease due, for the next pass
                log.warning("lease reaper: could not send %s (%s); trying again", name.member, exc)
                self.client.zadd(LEASES_KEY, {member: 0})
                continue
            reaped.append(name)
        return reaped

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.reap_once()
            except Exception as exc:  # never let the thread die: a worker without it stalls documents
                log.warning("lease reaper: %s", exc)
