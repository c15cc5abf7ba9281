"""The gRPC + Redis stack the `grpc` cells talk to: a private redis-server and both services.

They run as the production commands (`sharedllm serve compressor|decoder`) in their own
processes, started once per benchmark and shared by its cells: starting them per cell would
time model loading, which no request pays. Anything that keeps the stack from becoming ready
is raised as GrpcUnavailable with the reason, and the report says so instead of a number.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_TIMEOUT_S = 600.0  # both services load the model at once; the default one takes minutes on 2 cores


class GrpcUnavailable(RuntimeError):
    """The gRPC + Redis stack could not be started; the message says why."""


@dataclass(frozen=True)
class GrpcTargets:
    compressor: str
    decoder: str
    api_keys: dict[str, str]  # tenant -> its API key
    pids: dict[str, int]  # service -> its process id, for memory readings


def cell_tenant(repeat: int, length: int) -> str:
    """Every gRPC cell is its own tenant: the decoder's cache is per tenant, so a cell's first question
    is as cold as a new user's, even though every document is a prefix of the same text."""
    return f"bench-r{repeat}-n{length}"


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of cells and services: this checkout first on the path (a script run from a
    checkout measures its own code), and the torch thread count when one was asked for."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process(args: Sequence[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child process whose output goes to `log`; terminated (then killed) on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def _wait_ready(process: subprocess.Popen[bytes], log: Path, ready, what: str, deadline: float) -> None:
    while not ready():
        if process.poll() is not None:
            raise GrpcUnavailable(f"{what} exited with status {process.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            raise GrpcUnavailable(f"{what} was not ready within {READY_TIMEOUT_S:.0f} s: {_tail(log)}")
        time.sleep(0.2)


def _redis_ready(port: int) -> bool:
    import redis

    try:
        with redis.Redis(port=port, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


@contextmanager
def private_redis(workdir: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """A redis-server of its own on a free loopback port, nothing persisted; yields its URL."""
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise GrpcUnavailable("redis-server is not installed")
    port = _free_port()
    args = [redis_server, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir)]
    args += ["--save", "", "--appendonly", "no"]  # a benchmark store: nothing to persist
    log = workdir / "redis.log"
    with _process(args, log, env or dict(os.environ)) as process:
        _wait_ready(process, log, lambda: _redis_ready(port), "redis-server", time.monotonic() + READY_TIMEOUT_S)
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def grpc_stack(
    workdir: Path,
    model_flags: Sequence[str],
    threads: int | None,
    tenants: Sequence[str],
    serve_flags: Sequence[str] = (),
) -> Iterator[GrpcTargets]:
    """Start redis-server and both services on free loopback ports; stop them all on exit.

    model_flags: the `--model/--adapter/--device/--dtype` flags the cells get, so both paths run
    the same model, adapter and precision. tenants: one API key is made for each. serve_flags:
    more `sharedllm serve` flags for both services (admission, batching).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    api_keys = {tenant: secrets.token_urlsafe(24) for tenant in tenants}
    keys_file = workdir / "api-keys"
    keys_file.write_text("".join(f"{tenant} {key}\n" for tenant, key in api_keys.items()))
    keys_file.chmod(0o600)
    deadline = time.monotonic() + READY_TIMEOUT_S
    env = child_env(threads)
    with ExitStack() as stack:
        store_url = stack.enter_context(private_redis(workdir, env))
        targets = {}
        for service in ("compressor", "decoder"):
            service_port = _free_port()
            args = [sys.executable, "-m", "sharedllm", "serve", service, "--host", "127.0.0.1"]
            args += ["--port", str(service_port), "--store-url", store_url, "--log-level", "WARNING", *model_flags]
            args += ["--api-keys-file", str(keys_file), "--drain-delay-s", "0"]  # a private stack: no one to warn
            args += serve_flags
            if threads:
                args += ["--torch-threads", str(threads)]
            log = workdir / f"{service}.log"
            targets[service] = (f"127.0.0.1:{service_port}", stack.enter_context(_process(args, log, env)), log)
        for service, (target, process, log) in targets.items():
            _wait_ready(process, log, lambda target=target: _serving(target), f"the {service} service", deadline)
        pids = {service: process.pid for service, (_, process, _) in targets.items()}
        yield GrpcTargets(targets["compressor"][0], targets["decoder"][0], api_keys, pids)
