"""`sharedllm health --target HOST:PORT`: the gRPC health check, for container health checks.

Exits 0 when the service answers SERVING, 1 otherwise (NOT_SERVING, unreachable, or no answer
within the deadline), printing the status; the same protocol Kubernetes' native gRPC probes use.
Those probes speak plaintext only: a service behind TLS is checked with this command instead,
given the CA (--tls-ca or SHAREDLLM_TLS_CA).
"""

from __future__ import annotations

import argparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sharedllm.cli.options import ClientTlsArguments
from sharedllm.common.rpc.client import open_channel

TLS = ClientTlsArguments()


def add_command(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text)
    parser.add_argument("--target", required=True, help="HOST:PORT of the service")
    parser.add_argument("--service", default="", help="service name (default: the server as a whole)")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    TLS.add_arguments(parser.add_argument_group("TLS (a service started with --tls-cert)"))
    parser.set_defaults(handler=run_health)


def run_health(args: argparse.Namespace) -> int:
    with open_channel(args.target, TLS.from_args(args)) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=args.service)
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout_s).status
        except grpc.RpcError as exc:
            print(f"{args.target}: {exc.code().name}")
            return 1
    print(f"{args.target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1
