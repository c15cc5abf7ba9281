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


def free_port(highest: int = 65535) -> int:
    """A free loopback port, at most `highest` (the kernel's choice when that is no limit)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port <= highest:
            return port


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
        cluster: bool = False,
        replica_of: RedisServer | None = None,
        client_certificates: bool = False,
    ) -> None:
        """replica_of: start as that server's replica; client_certificates: with tls, require a
        client certificate signed by the server's own (the tests' CA)."""
        self.directory = directory
        self.replica_of = replica_of
        self.client_certificates = client_certificates
        self.appendonly = appendonly
        self.cluster = cluster
        self.bus_port = free_port()  # a cluster's node-to-node port (default port + 10000 may be taken)
        self.password = password
        self.tls = tls
        # Redis 7.0 refuses a cluster node above 55535 (it would put its bus port 10000 higher).
        self.port = free_port(55535 if cluster else 65535)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            url = f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.cert}"
            if self.client_certificates:  # the server's own certificate serves as the client's too
                url += f"&ssl_certfile={self.tls.cert}&ssl_keyfile={self.tls.key}"
            return url
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
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-auth-clients", "yes" if self.client_certificates else "no"]
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

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, like a hung or swapping server."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

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


class RedisClusterServers:
    """A real Redis Cluster of `masters` primaries on loopback, each with `replicas` replicas, made
    with `redis-cli --cluster create` (a replica takes over when its primary dies)."""

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = []
        for i in range(masters * (1 + replicas)):
            (directory / f"node{i}").mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(directory / f"node{i}", cluster=True))

    def url(self, node: int = 0) -> str:
        """The store URL through one node (the client learns the others from it)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[node].port}"

    def _cli(self, *args: str, timeout: float = 120.0) -> str:
        done = subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stdout[-1500:]} {done.stderr[-1500:]}")
        return done.stdout

    def node_id(self, node: int) -> str:
        return self.nodes[node].client().execute_command("CLUSTER", "MYID").decode()

    def slots_of(self, node: int) -> int:
        """How many hash slots `node` serves."""
        for line in self.nodes[node].client().execute_command("CLUSTER", "NODES").decode().splitlines():
            fields = line.split()
            if "myself" in fields[2]:
                return sum(int(b) - int(a) + 1 for a, _, b in (r.partition("-") for r in fields[8:] if "[" not in r))
        return 0

    def reshard(self, source: int, target: int, slots: int) -> None:
        """Move `slots` hash slots (and their keys) from one primary to another, as an operator does."""
        self._cli(
            "--cluster", "reshard", f"127.0.0.1:{self.nodes[0].port}",
            "--cluster-from", self.node_id(source), "--cluster-to", self.node_id(target),
            "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "10",
        )  # fmt: skip

    def __enter__(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        replicas = ["--cluster-replicas", str(self.replicas)] if self.replicas else []
        self._cli("--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes), *replicas, "--cluster-yes")
        deadline = time.monotonic() + 30
        while not all(self.healthy(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ready within 30 s")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for node in self.nodes:
            node.stop()

    def healthy(self, node: RedisServer) -> bool:
        """The node sees the cluster whole, and a replica has caught up with its primary."""
        info = node.client().info("replication")
        synced = info.get("role") == "master" or info.get("master_link_status") == "up"
        return synced and b"cluster_state:ok" in node.client().execute_command("CLUSTER", "INFO")

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now."""
        return [n for n in self.nodes if n._process is not None and n.client().info("replication")["role"] == "master"]
