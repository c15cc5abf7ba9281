"""Submitting and following batch jobs: the Python API behind `sharedllm batch`.

    client = BatchClient("redis://localhost:6379/0")
    job_id = client.submit(read_documents([Path("reports/")]), JobSpec(None, ("Who signed it?",)))
    client.status(job_id).state       # queued, running, done, done_with_errors, cancelled
    client.results(job_id)            # one dict per document: summary, answers, or its error
                                      # (--across: the last one holds the answers across all)

Submitting needs only Redis: the documents' text goes into the job record and the tasks are
sent by name, so the submitting process loads no model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sharedllm.common.batch import stages
from sharedllm.common.batch.app import BatchApp, BatchSettings
from sharedllm.common.batch.jobs import DocumentInput, JobSpec, JobStatus, JobStore
from sharedllm.common.config import Limits
from sharedllm.common.data.documents import read_text
from sharedllm.common.errors import InvalidInput

MAX_DOCUMENT_BYTES = 4 << 20  # well above a 131,072-token document (about 0.6 MB of English)


def read_documents(paths: Iterable[Path], max_bytes: int = MAX_DOCUMENT_BYTES) -> list[DocumentInput]:
    """Files, and the files of folders (sorted, recursively), as job documents. One that cannot be
    read, is not UTF-8 text, is empty or too large becomes a document that fails with the reason."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    return [_read(path, max_bytes) for path in files]


def _read(path: Path, max_bytes: int) -> DocumentInput:
    try:
        return DocumentInput(str(path), read_text(path, max_bytes))
    except InvalidInput as exc:
        return DocumentInput(str(path), None, str(exc))
    except OSError as exc:
        return DocumentInput(str(path), None, f"cannot read: {exc.strerror or exc}")


class BatchClient:
    def __init__(self, broker_url: str) -> None:
        """broker_url: the Redis of the job queue and records."""
        self.app = BatchApp(BatchSettings(broker_url=broker_url), sender=True)
        self.jobs = JobStore.from_url(broker_url)

    def submit(self, documents: list[DocumentInput], spec: JobSpec) -> str:
        """Record the job, then send each readable document's first task (compress; each task
        sends the next: summarise, then answer), and for a job asked across its documents the
        task that answers across them; returns the job id."""
        readable = sum(doc.error is None for doc in documents)
        limit = Limits().max_contexts_per_question
        if spec.across and readable > limit:
            raise InvalidInput(f"{readable} documents to ask across; one question reads at most {limit} contexts")
        job_id = self.jobs.create(spec, documents)
        for i, doc in enumerate(documents):
            if doc.error is None:
                stages.send(self.app, job_id, i)  # compress; each task sends the next (stages.py)
        if spec.across and any(doc.error is None for doc in documents):
            stages.send(self.app, job_id, len(documents), stages.ACROSS)  # after the documents' first tasks
        return job_id

    def status(self, job_id: str) -> JobStatus:
        return self.jobs.status(job_id)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        """Per document: its name and state, then its result or its error."""
        return [
            {"document": d.name, "state": d.state, **(d.result or {}), **({"error": d.error} if d.error else {})}
            for d in self.jobs.status(job_id).documents
        ]

    def cancel(self, job_id: str) -> JobStatus:
        return self.jobs.cancel(job_id)
