"""SIGTERM as orchestrators see it: a drain that probes can observe, and a quiet end for cut calls.

A served process (the compressor on the tiny model and a memory store, the cheapest real
service) keeps its port open and answers NOT_SERVING for the default drain delay, still taking
calls, then refuses them. Calls still running when the grace period ends are cancelled: each is
one WARNING line in the log, never an ERROR with a traceback, which would read as a bug.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_stack import NOT_SERVING, SERVING, health, status_of, wait_for_health, wait_until
from processes import stop_all
from redis_server import free_port

from sharedllm.common.generated.sharedllm.v1 import compressor_pb2 as cpb
from sharedllm.common.generated.sharedllm.v1 import compressor_pb2_grpc
from sharedllm.common.rpc.config import NetworkSettings

ROOT = Path(__file__).resolve().parents[1]
SHORT = "The cat sat on the mat. " * 10
LONG = "The cat sat on the mat. The dog lay by the door. " * 4500  # about 55,000 tokens: a second or so


def serve_compressor(tiny_model_dir: Path, tiny_adapter: Path, log: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`sharedllm serve compressor` on a free loopback port, its output in `log`; (process, target)."""
    port = free_port()
    command = [
        sys.executable, "-m", "sharedllm", "serve", "compressor", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(tiny_model_dir), "--adapter", str(tiny_adapter), "--store-url", "memory://",
        "--torch-threads", "1", "--health-interval-s", "0.2", *flags,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    return process, f"127.0.0.1:{port}"


def port_accepts(target: str) -> bool:
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def compress_status(target: str, text: str = SHORT) -> grpc.StatusCode:
    """The status of a Compress over a new connection, without retries (a refusal shows at once)."""
    with grpc.insecure_channel(target) as channel:
        stub = compressor_pb2_grpc.CompressorServiceStub(channel)
        return status_of(lambda: stub.Compress(cpb.CompressRequest(text=text.encode()), timeout=30))


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    stop_all(started, timeout_s=30)


def test_sigterm_keeps_the_port_open_and_not_serving_for_the_default_drain(
    tiny_model_dir, tiny_adapter, tmp_path, processes
):
    drain = NetworkSettings(port=0).drain_delay_s
    assert drain >= 5  # long enough for probes polling every few seconds to notice
    log = tmp_path / "compressor.log"
    process, target = serve_compressor(tiny_model_dir, tiny_adapter, log)  # the default drain delay
    processes.append(process)
    wait_for_health(target, SERVING, timeout=120)

    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for_health(target, NOT_SERVING, timeout=drain / 2)
    while time.monotonic() - signalled < drain - 1.5:  # inside the drain window, with a margin
        assert port_accepts(target)
        assert health(target) == NOT_SERVING  # each check a new connection
        assert compress_status(target) == grpc.StatusCode.OK  # calls are still taken
        time.sleep(0.3)

    wait_until(lambda: health(target) == grpc.StatusCode.UNAVAILABLE, timeout=drain, what="calls refused")
    assert time.monotonic() - signalled > drain - 0.5, log.read_text()[-2000:]
    assert compress_status(target) == grpc.StatusCode.UNAVAILABLE
    assert process.wait(timeout=30) == 0


def test_calls_cut_short_by_shutdown_are_one_warning_line_each(tiny_model_dir, tiny_adapter, tmp_path, processes):
    """No drain, a 0.2 s grace: a stalled upload (in flight until cancelled, whatever the machine's
    speed) and a long compression (in the one model thread) are cancelled by the shutdown."""
    log = tmp_path / "compressor.log"
    flags = ("--drain-delay-s", "0", "--shutdown-grace-s", "0.2", "--max-concurrent", "1")
    process, target = serve_compressor(tiny_model_dir, tiny_adapter, log, *flags)
    processes.append(process)
    wait_for_health(target, SERVING, timeout=120)

    release = threading.Event()

    def stalled_upload() -> Iterator[cpb.CompressStreamRequest]:
        yield cpb.CompressStreamRequest(text=SHORT.encode())
        release.wait(60)

    channel = grpc.insecure_channel(target)
    try:
        stub = compressor_pb2_grpc.CompressorServiceStub(channel)
        upload = stub.CompressStream.future(stalled_upload())
        long = stub.Compress.future(cpb.CompressRequest(text=LONG.encode()))
        wait_until(  # the server is at its limit: both calls are in, the long one in the model thread
            lambda: long.done() or compress_status(target) == grpc.StatusCode.RESOURCE_EXHAUSTED,
            what="the long compression to start",
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        with pytest.raises(grpc.RpcError) as cut:
            upload.result(timeout=10)
        assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert status_of(lambda: long.result(timeout=10)) != grpc.StatusCode.INTERNAL
    finally:
        release.set()
        channel.close()

    output = log.read_text()
    assert "Traceback" not in output and " ERROR " not in output, output[-3000:]
    cut_lines = [line for line in output.splitlines() if "cancelled during the server's shutdown" in line]
    assert any("WARNING" in line and "CompressStream -> CANCELLED" in line for line in cut_lines), output[-3000:]
