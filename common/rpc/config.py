"""What a service is configured with: network, store, model and evidence settings.

Plain values, checked where they are made, so that a service started from flags, from the
environment or by a test's own code gets the same validation (the flags live in the entry
layer, sharedllm/cli/options.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from sharedllm.common.config import ConfigError, ModelChoice
from sharedllm.common.engine.params import EvidenceSettings
from sharedllm.common.engine.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES
from sharedllm.common.engine.scheduler import DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK
from sharedllm.common.rpc.auth import ApiKeys
from sharedllm.common.rpc.tls import check_key_pair
from sharedllm.common.store import DEFAULT_REPLICA_TIMEOUT_S, DEFAULT_TIMEOUT_S, ContextStore, TenantQuotas, open_store
from sharedllm.common.store.decoded_cache import DEFAULT_CACHE_BYTES

MIB = 1 << 20


def _check_seconds(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name} must be finite and >= 0, got {value}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class NetworkSettings:
    """Where a service listens, what it admits, how it encrypts, and how it shuts down.

    drain_delay_s defaults to a few seconds rather than 0: probes and load balancers poll, and
    one that still sees the port open and NOT_SERVING stops sending work before calls are refused.
    """

    port: int
    host: str = "[::]"
    max_message_bytes: int = 8 * MIB
    max_concurrent: int = 4  # Compress/Generate calls at once (the decoder batches their steps)
    max_queued: int = 8  # calls waiting for a slot, first come first served; more are refused
    queue_timeout_s: float = 30.0  # the longest a call waits for a slot before it is refused
    api_keys: ApiKeys = field(default_factory=ApiKeys.disabled)
    shutdown_grace_s: float = 30.0  # how long SIGTERM waits for calls in flight
    drain_delay_s: float = 5.0  # NOT_SERVING this long, port still open, before refusing calls
    health_interval_s: float = 2.0  # how often the store is pinged
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the port speaks TLS instead of plaintext
    tls_key: Path | None = None  # PEM private key of tls_cert
    tls_client_ca: Path | None = None  # PEM roots; set: clients must present a certificate they signed (mTLS)

    def __post_init__(self) -> None:
        _check_positive(max_message_bytes=self.max_message_bytes, max_concurrent=self.max_concurrent)
        if self.max_queued < 0:
            raise ConfigError(f"max_queued must be >= 0, got {self.max_queued}")
        if not (math.isfinite(self.queue_timeout_s) and self.queue_timeout_s > 0):
            raise ConfigError(f"queue_timeout_s must be finite and > 0, got {self.queue_timeout_s}")
        _check_seconds(
            shutdown_grace_s=self.shutdown_grace_s,
            drain_delay_s=self.drain_delay_s,
            health_interval_s=self.health_interval_s,
        )
        if not 0 <= self.port < 1 << 16:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        check_key_pair(self.tls_cert, self.tls_key, "--tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                "--tls-client-ca asks clients for a certificate, which needs TLS: set --tls-cert and --tls-key too"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class StoreSettings:
    """Where contexts are stored, for how long, and how much of them stays decoded in memory."""

    url: str = "redis://localhost:6379/0"
    default_ttl_s: float | None = 24 * 3600.0  # lifetime after each use; None: contexts never expire
    # Largest streamed document; None: derived from the token limit (token_budget.max_document_bytes).
    max_document_bytes: int | None = None
    decoded_cache_bytes: int = DEFAULT_CACHE_BYTES  # verified nodes kept decoded for repeat questions; 0: none
    timeout_s: float = DEFAULT_TIMEOUT_S  # longest wait for one answer from the store
    retries: int | None = None  # further tries after a timeout or lost connection (None: 1, 5 on a cluster)
    quotas: TenantQuotas = field(default_factory=TenantQuotas)
    min_replicas: int = 0  # replicas a stored context reaches before Compress returns (WAIT); 0: do not wait
    replica_timeout_s: float = DEFAULT_REPLICA_TIMEOUT_S  # longest wait for them; then UNAVAILABLE

    def __post_init__(self) -> None:
        if self.max_document_bytes is not None:
            _check_positive(max_document_bytes=self.max_document_bytes)
        if self.default_ttl_s is not None:
            _check_seconds(default_ttl_s=self.default_ttl_s)
        if self.decoded_cache_bytes < 0:
            raise ConfigError(f"decoded_cache_bytes must be >= 0, got {self.decoded_cache_bytes}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"store timeout_s must be finite and > 0, got {self.timeout_s}")
        if self.retries is not None and self.retries < 0:
            raise ConfigError(f"store retries must be >= 0, got {self.retries}")
        if self.min_replicas < 0 or not (math.isfinite(self.replica_timeout_s) and self.replica_timeout_s > 0):
            raise ConfigError(
                f"store min_replicas must be >= 0 and replica_timeout_s > 0, got {self.min_replicas}, "
                f"{self.replica_timeout_s}"
            )

    def open(self) -> ContextStore:
        return open_store(
            self.url,
            timeout_s=self.timeout_s,
            retries=self.retries,
            min_replicas=self.min_replicas,
            replica_timeout_s=self.replica_timeout_s,
        )


@dataclass(frozen=True)
class BatchingSettings:
    """The decoder's continuous batching (engine/scheduler.py): how many answers one model step
    carries, how many prompt tokens a step reads while answers decode, and the memory kept of
    prompts read for prompts that begin the same way (0: none). max_batch 0: no scheduler, each
    answer steps the model on its own."""

    max_batch: int = DEFAULT_MAX_BATCH
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_BYTES >> 20

    def __post_init__(self) -> None:
        if self.max_batch < 0:
            raise ConfigError(f"max_batch must be >= 0, got {self.max_batch}")
        if self.prefix_cache_mib < 0:
            raise ConfigError(f"prefix_cache_mib must be >= 0, got {self.prefix_cache_mib}")
        _check_positive(prefill_chunk=self.prefill_chunk)


@dataclass(frozen=True)
class ServerConfig:
    network: NetworkSettings
    store: StoreSettings = field(default_factory=StoreSettings)
    model: ModelChoice = field(default_factory=ModelChoice)
    # The decoder's defaults; a request may override the budget and the mode.
    evidence: EvidenceSettings = field(default_factory=EvidenceSettings)
    torch_threads: int | None = None  # None: torch's choice
    batching: BatchingSettings = field(default_factory=BatchingSettings)

    def __post_init__(self) -> None:
        if self.torch_threads is not None:
            _check_positive(torch_threads=self.torch_threads)
