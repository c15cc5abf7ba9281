"""Documents per minute of a batch job, embedded worker against gRPC services, on this machine.

    python bench/batch_throughput.py --documents 3 --tokens 32768 --json bench/results/batch/throughput.json
    python bench/batch_throughput.py --documents 8 --tokens 8192 --modes embedded --in-flight 1 4

`--in-flight N...` runs each mode once per value of the worker's `--documents-in-flight` (tasks at
once, whose answers share batched model steps).

Each mode gets a private redis-server, the same documents (training-split Bible books, each cut to
its first --tokens tokens, so nothing held out is read) and one worker: `sharedllm worker
--embedded`, or a worker that only sends requests to the compressor and decoder services. A job
summarises every document and answers one question; the time is from submission to the job's end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from sharedllm.benchmark.report import write_json
from sharedllm.benchmark.services import child_env, grpc_stack, private_redis
from sharedllm.cli.options import default_data_dir
from sharedllm.common.batch.client import BatchClient, read_documents
from sharedllm.common.batch.jobs import JobSpec
from sharedllm.common.data.corpora import find_entry, load_text

BOOKS = ("Genesis", "Exodus", "Numbers", "Deuteronomy", "Judges", "Isaiah", "Leviticus", "Joshua")
QUESTION = "Who is the main person of this text?"


@contextmanager
def worker(broker: str, mode: list[str], threads: int, log: Path):
    command = [sys.executable, "-m", "sharedllm", "worker", *mode, "--broker-url", broker, "--log-level", "WARNING"]
    if "--embedded" in mode:
        command += ["--torch-threads", str(threads)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(threads))
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def run_job(broker: str, paths: list[Path], log: Path) -> dict:
    client = BatchClient(broker)
    started = time.perf_counter()
    job = client.submit(read_documents(paths), JobSpec(instruction=None, questions=(QUESTION,)))
    while (status := client.status(job)).state not in ("done", "done_with_errors"):
        if status.state == "cancelled" or time.perf_counter() - started > 7200:
            raise RuntimeError(f"job {status.state}; worker log: {log.read_text()[-2000:]}")
        time.sleep(1)
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 1),
        "documents_per_minute": round(len(paths) / (seconds / 60), 3),
        "documents": [
            {"name": Path(d.name).name, "state": d.state, "tokens": d.document_tokens, "timings": d.timings}
            for d in status.documents
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=("embedded", "grpc"), default=["embedded", "grpc"])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1], help="the worker's --documents-in-flight")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from sharedllm.common.model_loading import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(None)))
    report = {"tokens": args.tokens, "threads": args.threads, "cpus": os.cpu_count(), "modes": {}}
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        paths = []
        for book in BOOKS[: args.documents]:
            ids = tokenizer(load_text(args.data_dir, find_entry(args.data_dir, book, "bible")))["input_ids"]
            paths.append(work / f"{book}.txt")
            paths[-1].write_text(tokenizer.decode(ids[: args.tokens]), encoding="utf-8")
        for mode, in_flight in ((m, n) for m in args.modes for n in args.in_flight):
            name = mode if args.in_flight == [1] else f"{mode}, {in_flight} in flight"
            with ExitStack() as stack:
                broker = stack.enter_context(private_redis(work))
                flags = ["--embedded"]
                if mode == "grpc":
                    targets = stack.enter_context(grpc_stack(work, [], args.threads, ["batch"]))
                    flags = ["--compressor", targets.compressor, "--decoder", targets.decoder]
                    flags += ["--api-key", targets.api_keys["batch"]]
                flags += ["--documents-in-flight", str(in_flight)]
                log = work / f"{mode}-{in_flight}.log"
                stack.enter_context(worker(broker, flags, args.threads, log))
                report["modes"][name] = run_job(broker, paths, log)
            print(f"{name}: {report['modes'][name]['documents_per_minute']} documents/minute", flush=True)
    if args.json:
        write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
