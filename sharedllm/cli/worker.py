"""`sharedllm worker`: a Celery worker for batch jobs, with the model in it or on the services.

    sharedllm worker --embedded                                    # one machine: Redis + this
    sharedllm worker --compressor HOST:50051 --decoder HOST:50052  # a thin client of the services
    sharedllm worker --compressor HOST:50051 --decoder HOST:50052 --tls-ca ca.pem  # services behind TLS
    sharedllm worker --embedded -- --hostname gpu1@%h --max-tasks-per-child 50  # after --: Celery's options

The worker runs Celery's own worker (`celery worker`) on the batch app: one task at a time per
process (the solo pool), or `--documents-in-flight N` at once in threads, whose answers then
share batched model steps; both queues unless `--queues`.
Every flag can also be set as SHAREDLLM_<FLAG>.
"""

from __future__ import annotations

import argparse

from sharedllm.cli import observability
from sharedllm.cli.batch import add_broker_argument
from sharedllm.cli.observability import ObservabilityArguments
from sharedllm.cli.options import ClientTlsArguments, ModelArguments
from sharedllm.cli.server_options import apply_env_defaults
from sharedllm.common.batch.app import COMPRESS_QUEUE, GENERATE_QUEUE, BatchSettings
from sharedllm.common.rpc.tls import ClientTls
from sharedllm.common.telemetry import tracing

MODEL = ModelArguments()
TLS = ClientTlsArguments()


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=__doc__.split("\n")[0])
    mode = parser.add_argument_group("where the model runs (one of)")
    mode.add_argument("--embedded", action="store_true", help="load the model in this worker")
    mode.add_argument("--compressor", help="HOST:PORT of the compressor service")
    mode.add_argument("--decoder", help="HOST:PORT of the decoder service")
    mode.add_argument("--api-key", help="API key for the services")
    TLS.add_arguments(parser.add_argument_group("TLS to the services (services started with --tls-cert)"))
    embedded = parser.add_argument_group("embedded mode")
    MODEL.add_arguments(embedded)
    embedded.add_argument("--store-url", help="where contexts are stored (default: the broker's Redis)")
    embedded.add_argument("--torch-threads", type=int, help="CPU threads for torch (default: torch's choice)")
    work = parser.add_argument_group("jobs")
    add_job_arguments(work)
    work.add_argument(
        "--documents-in-flight",
        type=int,
        default=1,
        help="tasks this worker runs at once, in threads (default: %(default)s). Above 1, their answers share "
        "batched model steps: the embedded model's scheduler, or the decoder service's",
    )
    work.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    ObservabilityArguments().add_arguments(parser.add_argument_group("telemetry"))
    parser.add_argument("celery_args", nargs=argparse.REMAINDER, help="after --: options of `celery worker`")
    apply_env_defaults(parser)
    parser.set_defaults(handler=run_worker)


def add_job_arguments(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """The broker, queues and the limits of BatchSettings."""
    add_broker_argument(group)
    d = BatchSettings()
    group.add_argument("--queues", default=f"{COMPRESS_QUEUE},{GENERATE_QUEUE}", help="queues to take tasks from")
    group.add_argument("--soft-time-limit-s", type=int, default=d.soft_time_limit_s, help="a task is asked to stop")
    group.add_argument("--time-limit-s", type=int, default=d.time_limit_s, help="a task is killed")
    group.add_argument(
        "--visibility-timeout-s", type=int, default=d.visibility_timeout_s, help="an unacknowledged task returns"
    )
    group.add_argument("--max-retries", type=int, default=d.max_retries, help="on an unavailable or full service")
    group.add_argument("--max-deliveries", type=int, default=d.max_deliveries, help="of a task whose worker died")
    group.add_argument(
        "--lease-s", type=float, default=d.lease_s, help="a dead worker's document goes to another worker after this"
    )


def batch_settings(args: argparse.Namespace) -> BatchSettings:
    return BatchSettings(
        broker_url=args.broker_url,
        soft_time_limit_s=args.soft_time_limit_s,
        time_limit_s=args.time_limit_s,
        visibility_timeout_s=args.visibility_timeout_s,
        max_retries=args.max_retries,
        max_deliveries=args.max_deliveries,
        lease_s=args.lease_s,
    )


def settings_from_environment() -> BatchSettings:
    """The settings a `sharedllm worker` started with no flags would use: defaults, overridden by
    SHAREDLLM_<FLAG> variables (for Celery's own tools, which take no flags of ours)."""
    parser = argparse.ArgumentParser(prog="sharedllm worker")
    add_job_arguments(parser)
    apply_env_defaults(parser)
    return batch_settings(parser.parse_args([]))


def run_worker(args: argparse.Namespace) -> int:
    from sharedllm.common.batch import tasks
    from sharedllm.common.batch.app import BatchApp
    from sharedllm.common.errors import InvalidInput

    remote = args.compressor or args.decoder
    if args.embedded == bool(remote) or (remote and not (args.compressor and args.decoder)):
        raise InvalidInput("choose --embedded, or both --compressor and --decoder")
    if args.documents_in_flight < 1:
        raise InvalidInput(f"--documents-in-flight must be >= 1, got {args.documents_in_flight}")
    in_flight = args.documents_in_flight
    app = BatchApp(batch_settings(args))
    tasks.register(app)
    observability.start(args, "sharedllm-worker", celery=True)
    if args.embedded:
        choice, store_url, threads = MODEL.from_args(args), args.store_url or args.broker_url, args.torch_threads
        tasks.use_backend(lambda: _embedded_backend(choice, store_url, threads, batched=in_flight > 1))
    else:
        tls = TLS.from_args(args)
        tasks.use_backend(lambda: _remote_backend(args.compressor, args.decoder, args.api_key, tls))
    tasks.backend()  # load the model (or dial the services) now: a bad flag fails at start, not on a task
    celery_args = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args
    pool = ["--pool", "solo"] if in_flight == 1 else ["--pool", "threads", "--concurrency", str(in_flight)]
    argv = ["worker", *pool, "--queues", args.queues, "--loglevel", args.log_level]
    argv += ["--without-gossip", "--without-mingle", *celery_args]
    reaper = tasks.start_reaper(app)
    try:
        app.worker_main(argv)
    finally:
        reaper.stop()
        tracing.shutdown()
    return 0


def _embedded_backend(choice, store_url: str, threads: int | None, *, batched: bool):
    import torch

    from sharedllm.common.batch.backends import EmbeddedBackend
    from sharedllm.common.engine.engine import Engine
    from sharedllm.common.runtime import ContextRuntime
    from sharedllm.common.store import open_store

    if threads:
        torch.set_num_threads(threads)
    engine = Engine.from_choice(choice)
    if batched:  # several documents' answers at once: they share model steps
        engine.start_batching()
    return EmbeddedBackend(ContextRuntime(engine, open_store(store_url)))


def _remote_backend(compressor: str, decoder: str, api_key: str | None, tls: ClientTls | None):
    from sharedllm.common.batch.backends import RemoteBackend

    return RemoteBackend(compressor, decoder, api_key, tls=tls)
