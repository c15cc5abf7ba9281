"""`sharedllm serve compressor|decoder`: run one gRPC service until SIGTERM.

sharedllm serve compressor --store-url redis://localhost:6379/0          # port 50051
sharedllm serve decoder --store-url redis://localhost:6379/0             # port 50052
"""

from __future__ import annotations

import argparse
import asyncio
import importlib

from sharedllm import compressor_service, decoder_service
from sharedllm.cli import observability
from sharedllm.cli.server_options import ServerArguments

# `serve NAME` -> the service's package. The package holds only what the parser shows (its port);
# its server module loads gRPC, the store and torch, and is imported only to run it.
SERVICES = {"compressor": compressor_service, "decoder": decoder_service}


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    services = parser.add_subparsers(dest="service", required=True)
    for service, package in SERVICES.items():
        arguments = ServerArguments(package.DEFAULT_PORT, package.DEFAULT_MAX_CONCURRENT)
        p = services.add_parser(service, help=f"serve the {service} service (default port {package.DEFAULT_PORT})")
        arguments.add_arguments(p)
        p.set_defaults(handler=run_serve, arguments=arguments)


def run_serve(args: argparse.Namespace) -> int:
    from sharedllm.common.rpc.server import serve
    from sharedllm.common.telemetry import tracing

    spec = importlib.import_module(f"{SERVICES[args.service].__name__}.server").SPEC
    config = args.arguments.from_args(args)
    observability.start(args, f"sharedllm-{spec.name}", grpc_server=True)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    try:
        return asyncio.run(serve(spec, config))
    finally:
        tracing.shutdown()
