"""Telemetry flags of the long-running commands, and the trace of a client command.

`serve` and `worker` take `--metrics-port`, `--trace-exporter` and `--log-json`. A client
command (`compress`, `generate`, `batch submit`, `ask --trace`) is one root span whose context
travels with its calls (gRPC metadata, Celery headers), so the services' and workers' spans join
its trace; with TRACEPARENT set (W3C format) in the environment that span is itself a child of
the caller's, which is how a script makes `compress` and `generate` one trace.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

from sharedllm.common.telemetry import tracing


class ObservabilityArguments:
    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: none)")
        parser.add_argument(
            "--trace-exporter",
            choices=tracing.EXPORTERS,
            help="where spans go (default: $OTEL_TRACES_EXPORTER, else otlp when $OTEL_EXPORTER_OTLP_ENDPOINT is set)",
        )
        parser.add_argument("--log-json", action="store_true", help="log JSON lines with trace and span ids")


def start(args: argparse.Namespace, service: str, *, grpc_server: bool = False, celery: bool = False) -> None:
    """Logs, metrics endpoint and tracing of a long-running process, as its flags ask."""
    from sharedllm.common.telemetry import logs, metrics

    logs.setup(args.log_level, args.log_json)
    metrics.serve(args.metrics_port)
    tracing.setup(service, args.trace_exporter, grpc_server=grpc_server, celery=celery)


@contextmanager
def client_trace(command: str, exporter: str | None = None, *, celery: bool = False) -> Iterator[None]:
    """The root span of one client command (no-op when tracing is off)."""
    if not tracing.setup("sharedllm-cli", exporter, celery=celery):
        yield
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = None
    if "TRACEPARENT" in os.environ:
        parent = TraceContextTextMapPropagator().extract({"traceparent": os.environ["TRACEPARENT"]})
    try:
        with tracing.tracer.start_as_current_span(f"sharedllm {command}", context=parent):
            yield
    finally:
        tracing.shutdown()
