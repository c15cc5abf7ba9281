"""A real `redis-server` for tests, on a free loopback port in its own directory.

Why a real one: the store's guarantees (atomic publish, expiry, persistence, reconnects) live in
Redis's behaviour, which a fake would only imitate. The server can be stopped (gracefully or
killed) and restarted on the same port and directory, and is always stopped at the end, even
if the test process dies (the kernel signals it when its parent goes).
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_SERVER = shutil.which("redis-server")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 that is also the client's CA."""

    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        cert, key = directory / "redis.crt", directory / "redis.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cls(cert, key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the test process dies (Linux)."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    """One redis-server process; `url` works across stop/start (same port, same data directory)."""

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.cert}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        args = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", "redis.log",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            args += ["--tls-ca-cert-file", str(self.tls.cert)]
        else:
            args += ["--port", str(self.port)]
        on_linux = sys.platform.startswith("linux")
        self._process = subprocess.Popen(args, cwd=self.directory, preexec_fn=_die_with_parent if on_linux else None)
        self._wait_ready(timeout_s)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Graceful shutdown (SIGTERM flushes the append-only file), or SIGKILL like a crash."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill() if kill else process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def client(self) -> redis.Redis:
        """A plain client (no retries) for tests that inspect or damage keys directly."""
        return redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self._process.returncode}:\n{log}")
            try:
                with self.client() as probe:
                    if probe.ping():
                        return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.stop(kill=True)
                    raise
                time.sleep(0.02)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
