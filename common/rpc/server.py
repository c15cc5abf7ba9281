"""Start-up and shutdown of a service: one bootstrap for the compressor and the decoder.

Order of events. The port opens first with health NOT_SERVING, so orchestrators see a live
process that is not ready yet (the model takes seconds to minutes to load). The runtime is
loaded and warmed in a thread; from then on health follows the store. On SIGTERM or SIGINT:
health goes NOT_SERVING while the port stays open and new calls are still accepted for
`drain_delay_s` (5 s by default: probes and load balancers poll, and need a moment to notice),
then the server refuses new calls and waits up to `shutdown_grace_s` for the calls in flight,
then cancels what is left and exits 0. Each call cut short that way is one WARNING line from the
interceptor; `serve` lets those calls unwind before the event loop closes, because grpc logs a
call task that asyncio.run has to cancel as an ERROR with a traceback.

Transport: plaintext by default, TLS with `tls_cert`/`tls_key`, mutual TLS with
`tls_client_ca` too (docs/architecture.md §9). Plaintext on an address other hosts can reach
is logged as a WARNING at start: API keys travel in the metadata of every call.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sharedllm.common.engine import threads as torch_threads
from sharedllm.common.engine.engine import Engine
from sharedllm.common.rpc.config import NetworkSettings, ServerConfig
from sharedllm.common.rpc.errors import ServiceUnavailable
from sharedllm.common.rpc.health import NOT_SERVING, Health
from sharedllm.common.rpc.interceptor import ServiceInterceptor
from sharedllm.common.rpc.tls import plaintext_warning, read_pem
from sharedllm.common.rpc.workers import WorkerPool
from sharedllm.common.runtime import ContextRuntime

log = logging.getLogger(__name__)

UNWIND_TIMEOUT_S = 5.0  # for the calls a shutdown cancelled to finish; they take milliseconds


class ServerState:
    """What a servicer shares with the bootstrap: config, worker pool, and the runtime once loaded."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        network = config.network
        self.workers = WorkerPool(network.max_concurrent, network.max_queued, network.queue_timeout_s)
        self.loaded: ContextRuntime | None = None

    @property
    def runtime(self) -> ContextRuntime:
        if self.loaded is None:
            raise ServiceUnavailable("the model is still loading; retry shortly")
        return self.loaded


@dataclass(frozen=True)
class ServiceSpec:
    """What a service package hands to the bootstrap."""

    name: str  # `sharedllm serve <name>`
    full_name: str  # protobuf service name, for health, reflection and the interceptor
    default_port: int
    register: Callable[[ServerState, grpc.aio.Server], None]  # make the servicer and add it
    lower_only: bool  # the compressor: needs only the lower layers, and stores contexts (health checks room)


_LOADING = threading.Lock()


def load_runtime(config: ServerConfig, lower_only: bool = False) -> ContextRuntime:
    """Model, adapter and store as configured, warmed so the first request pays no one-time costs.

    lower_only: load just the layers the compressor runs. Loads in one process take turns:
    transformers' from_pretrained patches global state while it builds the model.
    """
    batching = not lower_only and config.batching.max_batch > 0
    # A batching decoder's model work runs in the scheduler's thread: it alone keeps torch's
    # threads, and no other thread (this one included) may keep a pool that slows its steps.
    model_threads = torch_threads.keep_single_threaded() if batching else None
    with _LOADING:
        engine = Engine.from_choice(config.model, lower_only=lower_only)
    if batching:
        batching = config.batching
        engine.start_batching(
            batching.max_batch,
            batching.prefill_chunk,
            threads=model_threads,
            prefix_cache_bytes=batching.prefix_cache_mib << 20,
        )
    return serving_runtime(engine, config)


def serving_runtime(engine: Engine, config: ServerConfig) -> ContextRuntime:
    """A runtime over `engine` with the configured store, lifetimes, cache and evidence, warmed up."""
    runtime = ContextRuntime(
        engine,
        config.store.open(),
        default_ttl_s=config.store.default_ttl_s,
        decoded_cache_bytes=config.store.decoded_cache_bytes,
        evidence=config.evidence,
        quotas=config.store.quotas,
    )
    runtime.warm_up()
    return runtime


def server_credentials(network: NetworkSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (read now: a bad file stops the start), or
    None for plaintext. With a client CA, a client without a certificate it signed is refused."""
    if network.tls_cert is None or network.tls_key is None:
        return None
    chain = read_pem(network.tls_cert, "TLS certificate (--tls-cert)")
    key = read_pem(network.tls_key, "TLS private key (--tls-key)")
    client_ca = read_pem(network.tls_client_ca, "TLS client CA (--tls-client-ca)") if network.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=bool(client_ca))


class RpcServer:
    """One service on one port; `start` returns once the port is open (the model loads after)."""

    def __init__(
        self,
        spec: ServiceSpec,
        config: ServerConfig,
        load: Callable[[ServerConfig, bool], ContextRuntime] = load_runtime,
    ) -> None:
        self.spec = spec
        self.config = config
        self.state = ServerState(config)
        self.health = Health([spec.full_name], config.network.health_interval_s, writes=spec.lower_only)
        self.stopped = asyncio.Event()  # set when the server should stop: a signal or a failed start
        self.failure: BaseException | None = None
        self._load = load
        self._interceptor = ServiceInterceptor([spec.full_name], config.network.api_keys)
        self._server: grpc.aio.Server | None = None
        self._supervisor: asyncio.Task | None = None

    async def start(self) -> int:
        """Open the port (NOT_SERVING), start loading the model; returns the bound port."""
        network = self.config.network
        credentials = server_credentials(network)
        limit = network.max_message_bytes
        server = grpc.aio.server(
            interceptors=[self._interceptor],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        self.spec.register(self.state, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
        reflection.enable_server_reflection([self.spec.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = f"{network.host}:{network.port}"
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        if warning := plaintext_warning(network.host, network.tls):
            log.warning("%s %s", self.spec.name, warning)
        await self.health.set(NOT_SERVING)
        await server.start()
        self._server = server
        self._supervisor = asyncio.create_task(self._become_ready())
        transport = ("mutual TLS" if network.tls_client_ca else "TLS") if network.tls else "plaintext"
        log.info("%s listening on %s:%d (%s); loading the model", self.spec.name, network.host, port, transport)
        return port

    async def _become_ready(self) -> None:
        try:
            self.state.loaded = await asyncio.to_thread(self._load, self.config, self.spec.lower_only)
        except Exception as exc:
            log.exception("%s could not start", self.spec.name)
            self.failure = exc
            self.stopped.set()
            return
        log.info("%s ready: model %s", self.spec.name, self.state.loaded.engine.loaded.name)
        await self.health.follow(self.state.loaded.store)

    async def stop(self) -> None:
        """Drain and stop (see the module docstring); safe to call once the server has started."""
        assert self._server is not None, "stop() before start()"
        network = self.config.network
        await self.health.shut_down()
        log.info("%s stopping: NOT_SERVING, still taking calls for %g s", self.spec.name, network.drain_delay_s)
        if network.drain_delay_s > 0:
            await asyncio.sleep(network.drain_delay_s)
        log.info("%s draining: waiting up to %g s for calls in flight", self.spec.name, network.shutdown_grace_s)
        self._interceptor.shutting_down = True
        await self._server.stop(network.shutdown_grace_s)
        if self._supervisor is not None:
            self._supervisor.cancel()
        self.state.workers.shutdown()
        if self.state.loaded is not None:
            self.state.loaded.store.close()
        log.info("%s stopped", self.spec.name)


async def serve(spec: ServiceSpec, config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0 after draining) or a failed start (exit 1)."""
    server = RpcServer(spec, config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stopped.set)
    await server.stopped.wait()
    await server.stop()
    await _unwind_calls(UNWIND_TIMEOUT_S)
    return 1 if server.failure is not None else 0


async def _unwind_calls(timeout_s: float) -> None:
    """Wait for the tasks still running, mostly calls the shutdown has just cancelled: grpc's stop
    returns before their tasks finish, and one that asyncio.run then cancels a second time is
    logged by grpc as an ERROR with a traceback, for a call that ended as planned."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=timeout_s)
