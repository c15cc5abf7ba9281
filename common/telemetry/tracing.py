"""Tracing: the SDK set up per process, the ecosystem's instrumentations, and phase spans.

Where spans go, by configuration: `setup(service, exporter)` with exporter "otlp" (to
OTEL_EXPORTER_OTLP_ENDPOINT, http://localhost:4317 by default; the standard OTEL_EXPORTER_OTLP_*
variables apply), "console" (one JSON object per span on stderr, for a developer), "none", or
None: OTEL_TRACES_EXPORTER if set, else "otlp" when OTEL_EXPORTER_OTLP_ENDPOINT is set, else
none. Besides, a process may keep its own spans in memory (`recorder`) to show them itself, as
`sharedllm ask --trace` does. W3C trace context crosses gRPC metadata and Celery headers through
the instrumentations (no hand-written propagation); health checks are not traced.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

EXPORTERS = ("otlp", "console", "none")
tracer = trace.get_tracer("sharedllm")
_provider = None


def exporter_from_env() -> str:
    chosen = os.environ.get("OTEL_TRACES_EXPORTER")
    if chosen:
        return chosen.split(",")[0].strip()
    return "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none"


def setup(
    service: str,
    exporter: str | None = None,
    *,
    grpc_server: bool = False,
    celery: bool = False,
    recorder: SpanExporter | None = None,
) -> bool:
    """Send this process's spans somewhere; False (and nothing set up) for "none" and no recorder.

    grpc_server: trace the calls this process serves (before the server is created); the
    gRPC client and Redis are always instrumented; celery: the worker's and sender's tasks;
    recorder: also hand every span to it as it ends (e.g. an InMemorySpanExporter).
    """
    global _provider
    exporter = exporter or exporter_from_env()
    if exporter not in EXPORTERS:
        raise ValueError(f"trace exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if (exporter == "none" and recorder is None) or _provider is not None:
        return _provider is not None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if recorder is not None:
        _provider.add_span_processor(SimpleSpanProcessor(recorder))
    if exporter == "console":
        _provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))  # stdout: answers
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    _instrument(grpc_server=grpc_server, celery=celery)
    return True


def _instrument(*, grpc_server: bool, celery: bool) -> None:
    from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient, filters
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    GrpcInstrumentorClient().instrument()
    RedisInstrumentor().instrument()
    if grpc_server:
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer

        GrpcAioInstrumentorServer(filter_=filters.negate(filters.health_check())).instrument()
    if celery:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()


def shutdown() -> None:
    """Export what is buffered (a process about to exit must not lose its last spans)."""
    if _provider is not None:
        _provider.shutdown()


@contextmanager
def span(name: str, **attributes: str | int | float | bool) -> Iterator[trace.Span]:
    """A child span of the current one for a phase, with the attributes an operator filters by."""
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def phases(parent_start_ns: int, durations: Iterable[tuple[str, float]]) -> None:
    """Child spans for consecutive phases measured by the engine (name, seconds), laid end to end
    from parent_start_ns: the engine times its phases without knowing about tracing."""
    start = parent_start_ns
    for name, seconds in durations:
        end = start + int(seconds * 1e9)
        tracer.start_span(name, start_time=start).end(end_time=end)
        start = end
