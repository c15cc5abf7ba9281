"""Real gRPC servers on loopback for the tests, and small client helpers.

In-process servers run the production bootstrap (sharedllm.common.rpc.server.RpcServer) on one shared
event loop in a background thread (grpc.aio wants one loop per process), configured by the
same flags as `sharedllm serve`. The tests talk to them with ordinary blocking clients, as a
user's program would.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sharedllm.cli.server_options import ServerArguments
from sharedllm.common.rpc.client import open_channel
from sharedllm.common.rpc.config import ServerConfig
from sharedllm.common.rpc.server import RpcServer, ServiceSpec, load_runtime
from sharedllm.common.rpc.tls import ClientTls
from sharedllm.common.runtime import ContextRuntime

T = TypeVar("T")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class EventLoopThread:
    """An asyncio loop running in a daemon thread; `run` executes a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def server_config(*flags: str) -> ServerConfig:
    """A ServerConfig parsed from `sharedllm serve` flags (loopback, any free port, and no drain
    delay by default: no load balancer watches a test's server, and every stop would wait for it)."""
    parser = argparse.ArgumentParser()
    arguments = ServerArguments(default_port=0)
    arguments.add_arguments(parser)
    defaults = ["--host", "127.0.0.1", "--log-level", "WARNING", "--drain-delay-s", "0"]
    return arguments.from_args(parser.parse_args([*defaults, *flags]))


class InProcessServer:
    def __init__(
        self,
        loop: EventLoopThread,
        spec: ServiceSpec,
        config: ServerConfig,
        load: Callable[[ServerConfig, bool], ContextRuntime] = load_runtime,
    ) -> None:
        self._loop = loop
        self._make = lambda: RpcServer(spec, config, load)
        self.server: RpcServer | None = None
        self.target = ""

    def __enter__(self) -> InProcessServer:
        async def start() -> int:
            self.server = self._make()  # made on the loop, where its asyncio objects live
            return await self.server.start()

        self.target = f"127.0.0.1:{self._loop.run(start())}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self._loop.run(self.server.stop())


def health(target: str, service: str = "", tls: ClientTls | None = None) -> int | grpc.StatusCode:
    """The health status, or the status code of a failed check (e.g. UNAVAILABLE once stopped),
    over a new connection (in plaintext, or over TLS as `tls` says)."""
    with grpc.insecure_channel(target) if tls is None else open_channel(target, tls) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status
        except grpc.RpcError as exc:
            return exc.code()


def wait_for_health(
    target: str, expected: int, timeout: float = 60.0, service: str = "", tls: ClientTls | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while (status := health(target, service, tls)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"health of {target} is {status}, expected {expected} within {timeout} s")
        time.sleep(0.05)


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status a call ends with (streams are read to the end)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)
