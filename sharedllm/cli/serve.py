"""`sharedllm serve compressor|decoder`: run one gRPC service until SIGTERM.

sharedllm serve compressor --store-url redis://localhost:6379/0          # port 50051
sharedllm serve decoder --store-url redis://localhost:6379/0             # port 50052
"""

from __future__ import annotations

import argparse
import asyncio

from sharedllm.cli import observability
from sharedllm.cli.server_options import ServerArguments
from sharedllm.common.rpc.server import ServiceSpec, serve
from sharedllm.common.telemetry import tracing
from sharedllm.compressor_service.server import SPEC as COMPRESSOR
from sharedllm.decoder_service.server import SPEC as DECODER

SERVICES: tuple[ServiceSpec, ...] = (COMPRESSOR, DECODER)


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    services = parser.add_subparsers(dest="service", required=True)
    for spec in SERVICES:
        arguments = ServerArguments(spec.default_port)
        p = services.add_parser(spec.name, help=f"serve {spec.full_name} (default port {spec.default_port})")
        arguments.add_arguments(p)
        p.set_defaults(handler=run_serve, spec=spec, arguments=arguments)


def run_serve(args: argparse.Namespace) -> int:
    config = args.arguments.from_args(args)
    observability.start(args, f"sharedllm-{args.spec.name}", grpc_server=True)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    try:
        return asyncio.run(serve(args.spec, config))
    finally:
        tracing.shutdown()
