"""Telemetry flags of the long-running commands, and the trace of a client command.

`serve` and `worker` take `--metrics-port`, `--trace-exporter` and `--log-json`. A client
command (`compress`, `generate`, `batch submit`, `ask`) is one root span whose context
travels with its calls (gRPC metadata, Celery headers), so the services' and workers' spans join
its trace; with TRACEPARENT set (W3C format) in the environment that span is itself a child of
the caller's, which is how a script makes `compress` and `generate` one trace. `ask --trace`
also keeps its spans and prints them as a tree on stderr when it ends, apart from the answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sharedllm.common.telemetry import tracing
from sharedllm.common.telemetry.span_tree import format_tree


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
def client_trace(command: str, *, tree: bool = False, celery: bool = False) -> Iterator[None]:
    """The root span of one client command, exported as the environment says (no-op when tracing
    is off and no tree is asked for); tree: print the command's spans as a tree on stderr at its end."""
    recorder = None
    if tree:
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        recorder = InMemorySpanExporter()
    if not tracing.setup("sharedllm-cli", celery=celery, recorder=recorder):
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
        if recorder is not None:
            print(format_tree(recorder.get_finished_spans()), file=sys.stderr)
