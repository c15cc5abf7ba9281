"""`sharedllm batch submit|status|results|cancel`: batch jobs on Celery, from any machine that
reaches the broker's Redis (no model here; workers do the work, see `sharedllm worker`).

    JOB=$(sharedllm batch submit reports/ --question "Who signed it?")
    sharedllm batch status "$JOB" --watch
    sharedllm batch results "$JOB" --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from sharedllm.cli.observability import client_trace
from sharedllm.common.batch.client import BatchClient, read_documents
from sharedllm.common.batch.jobs import TERMINAL, JobSpec, JobStatus
from sharedllm.common.engine.params import GROUNDING_MODES
from sharedllm.common.summaries.pipeline import DEFAULT_WORDS

DEFAULT_BROKER = "redis://localhost:6379/0"
FINAL_JOB_STATES = ("done", "done_with_errors", "cancelled")


def add_broker_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker-url",
        default=os.environ.get("SHAREDLLM_BROKER_URL", DEFAULT_BROKER),
        help="Redis of the job queue and records (default: $SHAREDLLM_BROKER_URL or %(default)s)",
    )


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    batch = sub.add_parser(name, help=help_text)
    commands = batch.add_subparsers(dest="batch_command", required=True)
    submit = commands.add_parser("submit", help="queue documents (files or folders); prints the job id")
    submit.add_argument("paths", nargs="+", type=Path)
    submit.add_argument("--instruction", help="what the summaries focus on (e.g. 'the risks'): its words weigh more")
    submit.add_argument("--question", action="append", default=[], help="a question for every document (repeatable)")
    submit.add_argument("--no-summary", action="store_true", help="answer the questions only")
    submit.add_argument(
        "--across",
        action="store_true",
        help="ask each question once across all the documents (answers in one more entry), not of each",
    )
    submit.add_argument("--max-new-tokens", type=int, default=JobSpec(None, ()).max_new_tokens)
    submit.add_argument("--seed", type=int)
    submit.add_argument(
        "--words", type=int, default=DEFAULT_WORDS, help=f"each summary's length bound (default {DEFAULT_WORDS})"
    )
    submit.add_argument("--rewrite", action="store_true", help="the model joins the summaries' sentences")
    submit.add_argument(
        "--grounding",
        choices=GROUNDING_MODES,
        default=JobSpec(None, ()).grounding,
        help="how answers rest on the document, as `ask --grounding` (default: %(default)s)",
    )
    submit.add_argument("--json", action="store_true", help="print the job's status as JSON instead of its id")
    submit.set_defaults(handler=run_submit)
    for command, help_line, handler in (
        ("status", "a job's progress (a bar on a terminal; JSON otherwise or with --json)", run_status),
        ("results", "a job's summaries, answers and errors", run_results),
        ("cancel", "stop a job; finished documents keep their results", run_cancel),
    ):
        p = commands.add_parser(command, help=help_line)
        p.add_argument("job_id")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=handler)
    commands.choices["status"].add_argument("--watch", action="store_true", help="follow the job until it ends")
    commands.choices["results"].add_argument("--out", type=Path, help="write results.json and one text per document")
    for p in commands.choices.values():
        add_broker_argument(p)


def run_submit(args: argparse.Namespace) -> int:
    spec = JobSpec(
        instruction=args.instruction,
        questions=tuple(args.question),
        summarize=not args.no_summary,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        summary_words=args.words,
        rewrite=args.rewrite,
        grounding=args.grounding,
        across=args.across,
    )
    client = BatchClient(args.broker_url)
    with client_trace("batch submit", celery=True):
        job_id = client.submit(read_documents(args.paths), spec)
    print(json.dumps(client.status(job_id).to_dict(), indent=2) if args.json else job_id)
    return 0


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render(status: JobStatus) -> str:
    """The job and each document as a progress line."""
    n = len(status.documents)
    lines = [f"job {status.job_id}: {status.state}  {_bar(status.finished, n)} {status.finished}/{n} documents"]
    for doc in status.documents:
        step = f"{doc.progress}/{doc.total}" if doc.total and doc.state not in TERMINAL else ""
        detail = f"  {doc.error}" if doc.error else ""
        lines.append(f"  {doc.index:>3} {doc.state:<12} {step:>7} {doc.name}{detail}")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    client = BatchClient(args.broker_url)
    as_json = args.json or not sys.stdout.isatty()
    while True:
        status = client.status(args.job_id)
        if as_json:
            print(json.dumps(status.to_dict(), indent=2))
        else:
            print(("\033[H\033[J" if args.watch else "") + render(status), flush=True)
        if not args.watch or status.state in FINAL_JOB_STATES:
            return 0
        time.sleep(2)


def _file_name(index: int, name: str) -> str:
    return f"{index:04d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(name).name)[:80]}.txt"


def run_results(args: argparse.Namespace) -> int:
    results = BatchClient(args.broker_url).results(args.job_id)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        for i, r in enumerate(results):
            (args.out / _file_name(i, r["document"])).write_text(_as_text(r) + "\n", encoding="utf-8")
        print(f"wrote {len(results) + 1} files to {args.out}")
    elif args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(_as_text(r) for r in results))
    return 0


def _as_text(result: dict) -> str:
    lines = [f"# {result['document']} ({result['state']})"]
    if result.get("error"):
        lines.append(f"error: {result['error']}")
    if result.get("summary"):
        lines += ["", result["summary"]]
    for qa in result.get("answers", []):
        lines += ["", f"Q: {qa['question']}", f"A: {qa['answer']}"]
        if qa.get("sources"):
            lines.append(f"   (from {', '.join(qa['sources'])})")
    return "\n".join(lines)


def run_cancel(args: argparse.Namespace) -> int:
    status = BatchClient(args.broker_url).cancel(args.job_id)
    print(json.dumps(status.to_dict(), indent=2) if args.json else render(status))
    return 0
