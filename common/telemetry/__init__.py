"""Traces, metrics and logs (docs/architecture.md, "Observability").

The library creates spans through the OpenTelemetry API only (a no-op until a process sets up
the SDK with `tracing.setup`); each process (service, worker, CLI) decides whether and where
its telemetry goes. Document text and prompts are never recorded: spans and logs carry ids,
counts, sizes and times.
"""
