"""Traces and metrics across real processes: both services, a batch worker and the CLI export
OTLP to a receiver started by the test; each process's Prometheus endpoint answers.

One trace per user action: `compress` then `generate` run with one TRACEPARENT (as a script
would) and a batch job submitted the same way each arrive as one connected trace, parent to
child across processes, with the engine's phases as spans. No span carries document text.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from processes import stop_all
from redis_server import free_port

from sharedllm.common.batch.client import BatchClient

ROOT = Path(__file__).resolve().parents[1]
SECRET = "Quillfeather"  # a word of the document that must never reach a span
DOCUMENT = f"Naomi went with Ruth to Bethlehem, and {SECRET} the scribe wrote it down. " * 40
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector: keeps every span it is sent, with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    self.spans += [(service, span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[tuple[str, object]]:
        with self.lock:
            return [(s, span) for s, span in self.spans if span.trace_id.hex() == trace_id]


@pytest.fixture
def receiver():
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    collector.endpoint = f"http://127.0.0.1:{port}"
    yield collector
    server.stop(0)


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "sharedllm", *command], env=env, stdout=out, stderr=subprocess.STDOUT
    )


def run(command: list[str], env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sharedllm", *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels
    pattern = rf"^{name}{{{wanted}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for_spans(receiver: Receiver, trace_id: str, predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not predicate(spans := receiver.trace(trace_id)):
        assert time.monotonic() < deadline, f"{what}; spans: {sorted({(s, x.name) for s, x in spans})}"
        time.sleep(0.2)
    return spans


def test_one_trace_per_action_across_processes_and_metrics(
    receiver, tiny_model_dir, tiny_adapter, make_redis_server, tmp_path
):
    redis = make_redis_server()
    ports = {"compressor": free_port(), "decoder": free_port()}
    metrics_ports = {"compressor": free_port(), "decoder": free_port(), "worker": free_port()}
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s, so the test need not wait long
    }
    model = ["--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--torch-threads", "1"]
    processes = []
    try:
        for name, port in ports.items():
            command = ["serve", name, "--host", "127.0.0.1", "--port", str(port), "--store-url", redis.url, *model]
            command += ["--metrics-port", str(metrics_ports[name]), "--log-json", "--health-interval-s", "0.2"]
            command += ["--drain-delay-s", "0"]
            processes.append(start(command, env, tmp_path / f"{name}.log"))
        for name, port in ports.items():
            deadline = time.monotonic() + 120
            while subprocess.run([sys.executable, "-m", "sharedllm", "health", "--target", f"127.0.0.1:{port}"],
                                 capture_output=True, env=env).returncode:  # fmt: skip
                assert time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()[-3000:]
                time.sleep(0.3)

        # compress then generate, one trace (the caller's TRACEPARENT)
        document = tmp_path / "doc.txt"
        document.write_text(DOCUMENT)
        client_env = {**env, "TRACEPARENT": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
        context_id = run(["compress", "--target", f"127.0.0.1:{ports['compressor']}", str(document)], client_env)
        context_id = context_id.strip()
        generate = ["generate", "--target", f"127.0.0.1:{ports['decoder']}", "--context", context_id, "Who?"]
        run([*generate, "--max-new-tokens", "4"], client_env)

        wanted = {"sharedllm compress", "sharedllm generate", "compress", "lower model and pooling", "store write",
                  "generate", "context open", "prefill", "decode"}  # fmt: skip

        def complete(spans) -> bool:
            """Every wanted span, and every parent of each: a server span ends (and is exported) after
            the engine spans inside it, so the names alone can arrive before the trace is whole."""
            ids = {x.span_id for _, x in spans}
            caller = bytes.fromhex("00f067aa0ba902b7")
            return wanted <= {x.name for _, x in spans} and all(x.parent_span_id in ids | {caller} for _, x in spans)

        spans = wait_for_spans(receiver, TRACE_ID, complete, "the compress+generate trace is incomplete")
        services = {service for service, _ in spans}
        assert {"sharedllm-cli", "sharedllm-compressor", "sharedllm-decoder"} <= services
        by_id = {span.span_id: (service, span) for service, span in spans}
        for _, span in spans:  # connected: every parent is in the trace, or is the caller's
            assert span.parent_span_id in by_id or span.parent_span_id.hex() == "00f067aa0ba902b7", span.name
        generate_span = next(span for service, span in spans if span.name == "generate")
        assert [e.name for e in generate_span.events] == ["context loaded", "first token"]
        server_span = by_id[generate_span.parent_span_id][1]
        assert by_id[server_span.parent_span_id][0] == "sharedllm-cli"  # the client's call, in another process
        health = [(svc, span.name) for svc, span in receiver.spans if "Health" in span.name]
        assert health == []  # health checks are not traced
        for _, span in receiver.spans:
            values = [str(a.value) for a in span.attributes] + [str(a.value) for e in span.events for a in e.attributes]
            assert not any(SECRET in v for v in values), span.name

        # metrics move, and a failed request counts under its status code
        assert metric(metrics_ports["decoder"], "sharedllm_requests_total", method="Generate", code="OK") >= 1
        assert metric(metrics_ports["decoder"], "sharedllm_time_to_first_token_seconds_count") >= 1
        assert metric(metrics_ports["compressor"], "sharedllm_compressed_tokens_total") > 0
        before = metric(metrics_ports["decoder"], "sharedllm_requests_total", method="Generate", code="NOT_FOUND")
        failed = subprocess.run(
            [sys.executable, "-m", "sharedllm", "generate", "--target", f"127.0.0.1:{ports['decoder']}",
             "--context", "no-such-context", "Who?"], env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert failed.returncode == 2 and "NOT_FOUND" in failed.stderr
        after = metric(metrics_ports["decoder"], "sharedllm_requests_total", method="Generate", code="NOT_FOUND")
        assert after == before + 1
        log_line = next(
            line for line in (tmp_path / "decoder.log").read_text().splitlines() if '"code": "NOT_FOUND"' in line
        )
        assert '"method": "Generate"' in log_line and '"level": "INFO"' in log_line

        # a batch job submitted with a TRACEPARENT: submitter, worker and services in one trace
        broker = redis.url[:-1] + "1"
        worker = ["worker", "--compressor", f"127.0.0.1:{ports['compressor']}", "--decoder",
                  f"127.0.0.1:{ports['decoder']}", "--broker-url", broker, "--metrics-port",
                  str(metrics_ports["worker"])]  # fmt: skip
        processes.append(start(worker, env, tmp_path / "worker.log"))
        job_trace = "0af7651916cd43dd8448eb211c80319c"
        job_env = {**env, "TRACEPARENT": f"00-{job_trace}-b7ad6b7169203331-01"}
        job = run(["batch", "submit", str(document), "--question", "Who?", "--max-new-tokens", "3",
                   "--rewrite", "--words", "60", "--broker-url", broker], job_env).strip()  # fmt: skip
        deadline = time.monotonic() + 120
        while BatchClient(broker).status(job).state not in ("done", "done_with_errors"):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.3)
        job_spans = wait_for_spans(
            receiver,
            job_trace,
            lambda s: {"sharedllm-worker", "sharedllm-compressor", "sharedllm-decoder"} <= {svc for svc, _ in s},
            "the batch job's trace does not reach the worker and both services",
        )
        counts = defaultdict(int)
        for service, _ in job_spans:
            counts[service] += 1
        assert counts["sharedllm-cli"] >= 1
        assert metric(metrics_ports["worker"], "sharedllm_batch_documents_total", state="done") == 1
    finally:
        stop_all(processes)
