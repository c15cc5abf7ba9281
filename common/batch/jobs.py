"""The record of a batch job in Redis: what was asked, each document's progress, results, errors.

Celery's own result backend says whether a task ran; it cannot say "document 7 is on section 3
of 16" or keep a document's section summaries across a worker's death. This record can: every
write is one Redis command or one transaction, a document reaches a terminal state exactly once
(so the job's count of finished documents is exact even when a task is delivered twice), and a
document's partial work (its context id, the summaries of the sections done) survives a crash
so the redelivered task resumes instead of starting over.

Keys (one job; all expire together, `ttl_s` after submission: 7 days by default):
    sharedllm:batch:{job}            hash: spec, state, created/finished times, counts, cancelled
    sharedllm:batch:{job}:doc:{i}    hash: name, state, stage, progress, attempts, context id, partial
                                     work, result, error, timings
    sharedllm:batch:{job}:text:{i}   the document's UTF-8 bytes, so any worker anywhere can read it
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from sharedllm.common.batch.leases import LEASES_KEY, Lease, LeaseName, held_by_another
from sharedllm.common.engine.params import GROUNDING_MODES, Grounding
from sharedllm.common.errors import InvalidInput
from sharedllm.common.summaries.pipeline import CALL_CHARS, DEFAULT_WORDS, SummarySettings
from sharedllm.common.telemetry import metrics

PREFIX = "sharedllm:batch:"
DEFAULT_TTL_S = 7 * 24 * 3600
RESTART_RETRIES = 20  # with backoff capped at 2 s: about 30 s for Redis to come back
TERMINAL = ("done", "failed", "cancelled")  # a document's final states
ACROSS_NAME = "(all documents)"  # the entry of a job asked across its documents: the answers
ACROSS_TASK = "across"  # its task's short name (stages.ACROSS)
WATCH_OWNER = "watch"  # the owner of the lease a poll of that task holds while documents are compressed
# KEYS[1] the entry's hash, KEYS[2] the leases; ARGV: holder, successor, lease seconds, lease member.
# By Redis's clock, as every lease (leases.py).
_PASS_WATCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local current = redis.call('HGET', KEYS[1], 'watch')
local expiry = redis.call('ZSCORE', KEYS[2], ARGV[4])
if current and current ~= ARGV[1] and expiry and tonumber(expiry) > now then return 0 end
redis.call('HSET', KEYS[1], 'watch', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
return 1
"""
JOB_STATES = ("queued", "running", "done", "done_with_errors", "cancelled")


class JobNotFound(InvalidInput):
    """No job has this id (never submitted, or expired)."""


@dataclass(frozen=True)
class JobSpec:
    """What a job asks of every document."""

    instruction: str | None  # what the summary focuses on; None: the whole document
    questions: tuple[str, ...]
    summarize: bool = True
    max_new_tokens: int = 120  # per answer
    seed: int | None = None
    summary_words: int = DEFAULT_WORDS  # the summary's length bound
    rewrite: bool = False  # the model joins the extracted sentences (SummarySettings.rewrite)
    call_chars: int = CALL_CHARS  # extracted text per model call, when rewriting
    grounding: Grounding = "quote"  # how answers rest on the document (SamplingParams.grounding)
    # Ask each question once across all the job's documents (one more entry holds the answers)
    # instead of once per document.
    across: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 4096:
            raise InvalidInput(f"max_new_tokens must be in [1, 4096], got {self.max_new_tokens}")
        self.summary_settings()  # refuses a bad length bound, instruction or call size
        if self.grounding not in GROUNDING_MODES:
            raise InvalidInput(f"grounding must be one of {', '.join(GROUNDING_MODES)}, got {self.grounding!r}")
        if not self.summarize and not self.questions:
            raise InvalidInput("a job without a summary needs at least one question")
        if self.across and not self.questions:
            raise InvalidInput("a job that asks across its documents needs at least one question")

    def summary_settings(self) -> SummarySettings:
        """The settings `sharedllm summarize` takes for the same summary."""
        return SummarySettings(
            words=self.summary_words, instruction=self.instruction, rewrite=self.rewrite, call_chars=self.call_chars
        )


@dataclass(frozen=True)
class DocumentInput:
    """One submitted document: its name and text, or why it cannot be processed."""

    name: str
    text: str | None
    error: str | None = None


@dataclass
class DocumentStatus:
    index: int
    name: str
    state: str  # queued, compressing, summarizing, answering, done, failed, cancelled
    progress: int = 0  # sections summarised or questions answered so far
    total: int = 0
    attempts: int = 0  # deliveries of this document's tasks that started work
    context_id: str | None = None
    reused_context: bool = False
    document_tokens: int = 0
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None


@dataclass
class JobStatus:
    job_id: str
    state: str
    spec: JobSpec
    documents: list[DocumentStatus]
    created_unix_s: float
    finished_unix_s: float | None

    @property
    def finished(self) -> int:
        return sum(d.state in TERMINAL for d in self.documents)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "spec": asdict(self.spec),
            "created_unix_s": self.created_unix_s,
            "finished_unix_s": self.finished_unix_s,
            "documents": [asdict(d) for d in self.documents],
        }


def _loads(value: bytes | None, default: Any = None) -> Any:
    return default if value is None else json.loads(value)


class JobStore:
    """Jobs in one Redis database (the broker's, by default)."""

    def __init__(self, client: redis.Redis, ttl_s: int = DEFAULT_TTL_S) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._pass_watch = client.register_script(_PASS_WATCH)

    @classmethod
    def from_url(cls, url: str, ttl_s: int = DEFAULT_TTL_S) -> JobStore:
        """A store whose calls ride out a restart of Redis (the broker's, by default): a call that
        loses its connection is tried again with backoff (RESTART_RETRIES times, about 30 s)."""
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), RESTART_RETRIES)
        client = redis.Redis.from_url(
            url,
            socket_timeout=10,
            socket_connect_timeout=5,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError],
        )
        return cls(client, ttl_s)

    def _job(self, job_id: str) -> str:
        return f"{PREFIX}{job_id}"

    def _doc(self, job_id: str, index: int) -> str:
        return f"{PREFIX}{job_id}:doc:{index}"

    def _text(self, job_id: str, index: int) -> str:
        return f"{PREFIX}{job_id}:text:{index}"

    def lease(self, job_id: str, index: int, task: str, owner: str, lease_s: float) -> Lease:
        """The lease a task holds while it works on the document (leases.py)."""
        return Lease(self.client, LeaseName(job_id, index, task, owner), self._doc(job_id, index), lease_s)

    def stage_done(self, job_id: str, index: int, task: str) -> bool:
        """Whether the document's `task` finished and sent the next one."""
        return self.client.hexists(self._doc(job_id, index), f"done:{task}")

    def mark_stage_done(self, job_id: str, index: int, task: str) -> None:
        self.client.hset(self._doc(job_id, index), f"done:{task}", 1)

    def leased_elsewhere(self, job_id: str, index: int, task: str, owner: str) -> bool:
        """Whether another delivery of `task` holds a live lease on the document (it is being worked on)."""
        return held_by_another(self.client, self._doc(job_id, index), task, owner)

    def _keys(self, job_id: str, n: int) -> list[str]:
        return [self._job(job_id)] + [k for i in range(n) for k in (self._doc(job_id, i), self._text(job_id, i))]

    # ---- writing ---------------------------------------------------------------------

    def create(self, spec: JobSpec, documents: list[DocumentInput]) -> str:
        """Record a new job; documents that arrived broken are failed at once, the rest queued."""
        if not documents:
            raise InvalidInput("a job needs at least one document")
        job_id = uuid.uuid4().hex
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            self._job(job_id),
            mapping={
                "spec": json.dumps(asdict(spec)),
                "state": "queued",
                "created": now,
                "documents": len(documents),
                "finished": sum(d.error is not None for d in documents),
                "cancelled": 0,
            },
        )
        for i, doc in enumerate(documents):
            fields: dict[str, Any] = {"name": doc.name, "state": "queued", "attempts": 0}
            if doc.error is not None:
                fields |= {"state": "failed", "error": doc.error, "terminal": 1}
            else:
                pipe.set(self._text(job_id, i), doc.text.encode("utf-8"))
            pipe.hset(self._doc(job_id, i), mapping=fields)
        entries = len(documents)
        if spec.across:  # one more entry, after the documents: the answers across all of them
            pipe.hset(self._doc(job_id, entries), mapping={"name": ACROSS_NAME, "state": "queued", "attempts": 0})
            pipe.hset(self._job(job_id), "documents", entries + 1)
            entries += 1
        for key in self._keys(job_id, entries):
            pipe.expire(key, self.ttl_s)
        pipe.execute()
        if all(d.error is not None for d in documents):
            if spec.across:
                self.finish(job_id, len(documents), "failed", error="no document could be read")
            else:
                self._settle(job_id)
        return job_id

    def pass_watch(self, job_id: str, index: int, holder: str, successor: str, lease_s: float) -> bool:
        """Hand the watch over a job's question across its documents from `holder` to `successor`
        (the next poll's task id), its lease renewed; False, and nothing changed, when another poll
        holds a live watch (a duplicate chain, which then ends). While the documents are compressed
        one poll at a time watches; if its worker dies, the watch's lease lapses and a reaper sends
        the task again, which takes the watch over."""
        member = LeaseName(job_id, index, ACROSS_TASK, WATCH_OWNER).member
        return bool(
            self._pass_watch(keys=[self._doc(job_id, index), LEASES_KEY], args=[holder, successor, lease_s, member])
        )

    def end_watch(self, job_id: str, index: int) -> None:
        """The documents are ready: no poll watches any more (its lease is not reaped)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(LEASES_KEY, LeaseName(job_id, index, ACROSS_TASK, WATCH_OWNER).member)
        pipe.hdel(self._doc(job_id, index), "watch")
        pipe.execute()

    def documents_waited_for(self, job_id: str, across: int) -> list[int]:
        """The documents (those before entry `across`) that the job's question across them waits
        for: neither compressed yet nor finished."""
        docs = [self.document(job_id, i) for i in range(across)]
        return [d.index for d in docs if d.context_id is None and d.state not in TERMINAL]

    def text(self, job_id: str, index: int) -> str:
        data = self.client.get(self._text(job_id, index))
        if data is None:
            raise JobNotFound(f"job {job_id} has no document {index} (expired or never submitted)")
        return data.decode("utf-8")

    def begin(self, job_id: str, index: int, stage: str) -> DocumentStatus | None:
        """A task starts work on a document: None when there is nothing to do (the document is
        finished, or the job was cancelled, which is recorded); else its status, attempts counted."""
        doc = self.document(job_id, index)
        if doc.state in TERMINAL:
            return None
        if self.cancelled(job_id):
            self.finish(job_id, index, "cancelled", error="the job was cancelled")
            return None
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self._doc(job_id, index), "attempts", 1)
        pipe.hset(self._doc(job_id, index), mapping={"state": stage})
        pipe.hset(self._job(job_id), "state", "running")
        attempts = pipe.execute()[0]
        doc.attempts, doc.state = attempts, stage
        return doc

    def count_delivery(self, job_id: str, index: int, stage: str, retries: int) -> int:
        """How many times this stage's task started with this retry count: more than once means
        a delivery died without finishing (a retry is a new task, counted apart)."""
        return int(self.client.hincrby(self._doc(job_id, index), f"deliveries:{stage}:{retries}", 1))

    def update(self, job_id: str, index: int, **fields: Any) -> None:
        """Progress and partial work of a document (JSON for structured values)."""
        encoded = {k: json.dumps(v) if isinstance(v, dict | list | tuple | bool) else v for k, v in fields.items()}
        self.client.hset(self._doc(job_id, index), mapping=encoded)

    def add_timing(self, job_id: str, index: int, name: str, seconds: float) -> None:
        self.client.hset(self._doc(job_id, index), f"t:{name}", seconds)

    def partial(self, job_id: str, index: int, name: str) -> list[Any]:
        """A list of partial results saved so far (e.g. section summaries), for resuming."""
        return _loads(self.client.hget(self._doc(job_id, index), f"partial:{name}"), [])

    def save_partial(self, job_id: str, index: int, name: str, values: list[Any]) -> None:
        self.client.hset(self._doc(job_id, index), f"partial:{name}", json.dumps(values))

    def finish(
        self, job_id: str, index: int, state: str, *, result: dict[str, Any] | None = None, error: str | None = None
    ) -> bool:
        """Move a document to a terminal state, once: a second call (a redelivered task that got
        this far too) changes nothing and returns False. The job settles when its last document does."""
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state}")
        if not self.client.hsetnx(self._doc(job_id, index), "terminal", 1):
            return False
        metrics.DOCUMENTS.labels(state).inc()
        fields: dict[str, Any] = {"state": state, "finished": time.time()}
        if result is not None:
            fields["result"] = json.dumps(result)
        if error is not None:
            fields["error"] = error
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._doc(job_id, index), mapping=fields)
        pipe.hincrby(self._job(job_id), "finished", 1)
        finished, total = pipe.execute()[1], int(self.client.hget(self._job(job_id), "documents") or 0)
        if finished >= total:
            self._settle(job_id)
        return True

    def _settle(self, job_id: str) -> None:
        status = self.status(job_id)
        states = {d.state for d in status.documents}
        final = "done" if states == {"done"} else "done_with_errors"
        if self.cancelled(job_id):
            final = "cancelled"
        self.client.hset(self._job(job_id), mapping={"state": final, "finished_at": time.time()})

    def cancel(self, job_id: str) -> JobStatus:
        """Stop the job: documents not started are cancelled when their task comes up; one in the
        middle stops at its next step. Finished documents keep their results."""
        status = self.status(job_id)  # raises JobNotFound
        self.client.hset(self._job(job_id), "cancelled", 1)
        if status.state not in ("done", "done_with_errors", "cancelled"):
            self.client.hset(self._job(job_id), "state", "cancelling")
        for doc in status.documents:
            if doc.state == "queued":
                self.finish(job_id, doc.index, "cancelled", error="the job was cancelled")
        return self.status(job_id)

    def cancelled(self, job_id: str) -> bool:
        return self.client.hget(self._job(job_id), "cancelled") == b"1"

    # ---- reading ---------------------------------------------------------------------

    def spec(self, job_id: str) -> JobSpec:
        raw = self.client.hget(self._job(job_id), "spec")
        if raw is None:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or expired)")
        spec = json.loads(raw)
        # Only the fields this version knows: a job submitted before an upgrade (its spec had
        # "section_chars") still runs, with the defaults for what it did not say.
        known = {f.name for f in fields(JobSpec)}
        return JobSpec(**{k: v for k, v in spec.items() if k in known} | {"questions": tuple(spec["questions"])})

    def document(self, job_id: str, index: int) -> DocumentStatus:
        raw = self.client.hgetall(self._doc(job_id, index))
        if not raw:
            raise JobNotFound(f"job {job_id} has no document {index}")
        f = {k.decode(): v for k, v in raw.items()}
        return DocumentStatus(
            index=index,
            name=f["name"].decode(),
            state=f["state"].decode(),
            progress=int(f.get("progress", 0)),
            total=int(f.get("total", 0)),
            attempts=int(f.get("attempts", 0)),
            context_id=f["context_id"].decode() if "context_id" in f else None,
            reused_context=_loads(f.get("reused_context"), False),
            document_tokens=int(f.get("document_tokens", 0)),
            error=f["error"].decode() if "error" in f else None,
            timings={k[2:]: float(v) for k, v in f.items() if k.startswith("t:")},
            result=_loads(f.get("result")),
        )

    def status(self, job_id: str) -> JobStatus:
        raw = self.client.hgetall(self._job(job_id))
        if not raw:
            raise JobNotFound(f"no job {job_id!r} (never submitted, or expired)")
        f = {k.decode(): v for k, v in raw.items()}
        return JobStatus(
            job_id=job_id,
            state=f["state"].decode(),
            spec=self.spec(job_id),
            documents=[self.document(job_id, i) for i in range(int(f["documents"]))],
            created_unix_s=float(f["created"]),
            finished_unix_s=float(f["finished_at"]) if "finished_at" in f else None,
        )
