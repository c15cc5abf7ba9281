"""The argument groups of `sharedllm serve`: network and store, and the environment as defaults.

Apart from options.py because they build the services' configuration, which brings the store
and gRPC libraries; the clients and the embedded commands never need them. Those libraries (and
torch, which the store's codec needs) load in `from_args`, not with the parser, so that
`serve --help` starts at once: a flag left unset takes the settings' own default there.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sharedllm.cli.observability import ObservabilityArguments
from sharedllm.cli.options import TRUE_WORDS, EvidenceArguments, ModelArguments
from sharedllm.common.engine.token_budget import BYTES_PER_TOKEN_BOUND
from sharedllm.common.errors import InvalidInput

if TYPE_CHECKING:
    from sharedllm.common.rpc.config import NetworkSettings, ServerConfig, StoreSettings
    from sharedllm.common.store import TenantQuotas

ENV_PREFIX = "SHAREDLLM_"


def _given(args: argparse.Namespace, **fields: str) -> dict[str, Any]:
    """Settings field -> value of its flag (field=flag dest), for the flags the command line or the
    environment set; the others are left out, so that the settings' defaults apply."""
    return {field: getattr(args, dest) for field, dest in fields.items() if getattr(args, dest) is not None}


class NetworkArguments:
    """Where a service listens, whom it admits, how it shuts down; --log-level. A flag left unset
    takes NetworkSettings' default."""

    def __init__(self, default_port: int, default_concurrent: int | None = None) -> None:
        """default_concurrent: this service's --max-concurrent default (None: NetworkSettings'),
        and twice it queued."""
        self.default_port = default_port
        self.default_concurrent = default_concurrent

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        parser.add_argument("--host", help="address to listen on")
        parser.add_argument("--port", type=int, default=self.default_port, help="0 picks a free port")
        parser.add_argument("--max-message-bytes", type=int, help="largest message")
        concurrent = self.default_concurrent
        parser.add_argument(
            "--max-concurrent",
            type=int,
            default=concurrent,
            help="Compress/Generate calls at once (default: %(default)s)",
        )
        parser.add_argument(
            "--max-queued",
            type=int,
            default=None if concurrent is None else 2 * concurrent,
            help="calls waiting for a slot, first come first served, before RESOURCE_EXHAUSTED (default: %(default)s)",
        )
        parser.add_argument("--queue-timeout-s", type=float, help="the longest a call waits for a slot")
        parser.add_argument("--api-keys-file", type=Path, help="`TENANT KEY` per line; unset: no authentication")
        parser.add_argument("--shutdown-grace-s", type=float, help="how long SIGTERM waits for calls")
        parser.add_argument(
            "--drain-delay-s",
            type=float,
            help="after SIGTERM, NOT_SERVING this long with the port open (probes notice) before refusing calls",
        )
        parser.add_argument("--health-interval-s", type=float, help="how often the store is pinged")
        parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (with --tls-key)")
        parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
        parser.add_argument(
            "--tls-client-ca", type=Path, help="PEM CA: clients must present a certificate it signed (mutual TLS)"
        )
        parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def from_args(self, args: argparse.Namespace) -> NetworkSettings:
        from sharedllm.common.rpc.auth import ApiKeys
        from sharedllm.common.rpc.config import NetworkSettings

        settings = _given(
            args,
            host="host",
            max_message_bytes="max_message_bytes",
            max_concurrent="max_concurrent",
            max_queued="max_queued",
            queue_timeout_s="queue_timeout_s",
            shutdown_grace_s="shutdown_grace_s",
            drain_delay_s="drain_delay_s",
        )
        if args.health_interval_s is not None:
            settings["health_interval_s"] = max(args.health_interval_s, 0.05)
        return NetworkSettings(
            port=args.port,
            api_keys=ApiKeys.from_file(args.api_keys_file) if args.api_keys_file else ApiKeys.disabled(),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            **settings,
        )


class StoreArguments:
    """Where contexts live, their lifetime, the upload limit and the decoded-node cache. A flag left
    unset takes StoreSettings' default."""

    def add_arguments(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        parser.add_argument("--store-url", help="redis://, rediss:// or memory://")
        parser.add_argument("--default-ttl-s", type=float, help="context lifetime; 0: none")
        parser.add_argument(
            "--max-document-bytes",
            type=int,
            default=0,
            help=f"largest document upload; 0: {BYTES_PER_TOKEN_BOUND} bytes per token of the token limit",
        )
        parser.add_argument("--store-timeout-s", type=float, help="longest wait for one answer from Redis")
        parser.add_argument(
            "--store-retries",
            type=int,
            default=-1,
            help="further tries after a timeout or a lost connection; -1: 1, or 5 on a Redis Cluster",
        )
        parser.add_argument(
            "--store-min-replicas",
            type=int,
            help="Compress returns once a context reached this many Redis replicas (WAIT), else UNAVAILABLE",
        )
        parser.add_argument("--store-replica-timeout-s", type=float, help="longest wait for those replicas")
        parser.add_argument(
            "--tenant-max-contexts", type=int, default=0, help="stored contexts per tenant; 0: no limit"
        )
        parser.add_argument("--tenant-max-bytes", type=int, default=0, help="stored bytes per tenant; 0: no limit")
        parser.add_argument(
            "--tenant-quotas-file",
            type=Path,
            help="`TENANT [max_contexts=N] [max_bytes=N]` per line: tenants with their own quota",
        )
        parser.add_argument(
            "--decoded-cache-mib",
            type=int,
            help="verified context nodes kept decoded in memory for repeat questions; 0: none",
        )

    def from_args(self, args: argparse.Namespace) -> StoreSettings:
        from sharedllm.common.rpc.config import MIB, StoreSettings

        settings = _given(
            args,
            url="store_url",
            timeout_s="store_timeout_s",
            min_replicas="store_min_replicas",
            replica_timeout_s="store_replica_timeout_s",
        )
        if args.default_ttl_s is not None:
            settings["default_ttl_s"] = args.default_ttl_s or None
        if args.decoded_cache_mib is not None:
            if args.decoded_cache_mib < 0:
                raise InvalidInput(f"--decoded-cache-mib must be >= 0, got {args.decoded_cache_mib}")
            settings["decoded_cache_bytes"] = args.decoded_cache_mib * MIB
        return StoreSettings(
            max_document_bytes=args.max_document_bytes or None,
            retries=None if args.store_retries == -1 else args.store_retries,
            quotas=self._quotas(args),
            **settings,
        )

    @staticmethod
    def _quotas(args: argparse.Namespace) -> TenantQuotas:
        from sharedllm.common.store import Quota, TenantQuotas

        default = Quota(max_contexts=args.tenant_max_contexts or None, max_bytes=args.tenant_max_bytes or None)
        if args.tenant_quotas_file is None:
            return TenantQuotas(default)
        return TenantQuotas.from_file(args.tenant_quotas_file, default)


class ServerArguments:
    """Every flag of `sharedllm serve`, each also settable as SHAREDLLM_<FLAG> in the environment.

    Why both: a developer types flags; a container sets environment variables. Flags win over
    the environment, which wins over the built-in default; `--help` names the variable of each.
    """

    def __init__(self, default_port: int, default_concurrent: int | None = None) -> None:
        self.network = NetworkArguments(default_port, default_concurrent)
        self.store = StoreArguments()
        self.model = ModelArguments()
        self.evidence = EvidenceArguments(tuning=True)

    def add_arguments(self, parser: argparse.ArgumentParser, environ: Mapping[str, str] = os.environ) -> None:
        self.network.add_arguments(parser.add_argument_group("network"))
        self.store.add_arguments(parser.add_argument_group("store"))
        model = parser.add_argument_group("model")
        self.model.add_arguments(model)
        model.add_argument(
            "--torch-threads",
            type=int,
            help="CPU threads for torch (default: torch's choice); a batching decoder gives them to its scheduler",
        )
        batching = parser.add_argument_group("batching (decoder)")
        batching.add_argument(
            "--max-batch", type=int, help="answers one model step carries (continuous batching); 0: none"
        )
        batching.add_argument(
            "--prefill-chunk",
            type=int,
            help="prompt tokens a model step reads while answers decode (at least one 128-token block; default 512)",
        )
        batching.add_argument(
            "--prefix-cache-mib",
            type=int,
            help="memory kept of prompts read, for later prompts that begin the same way (MiB; default 256; 0: none)",
        )
        self.evidence.add_arguments(parser.add_argument_group("evidence (decoder defaults; requests may override)"))
        ObservabilityArguments().add_arguments(parser.add_argument_group("telemetry"))
        apply_env_defaults(parser, environ)

    def from_args(self, args: argparse.Namespace) -> ServerConfig:
        from sharedllm.common.rpc.config import BatchingSettings, ServerConfig

        return ServerConfig(
            network=self.network.from_args(args),
            store=self.store.from_args(args),
            model=self.model.from_args(args),
            evidence=self.evidence.from_args(args),
            torch_threads=args.torch_threads,
            batching=BatchingSettings(
                **_given(
                    args, max_batch="max_batch", prefill_chunk="prefill_chunk", prefix_cache_mib="prefix_cache_mib"
                )
            ),
        )


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] = os.environ) -> None:
    """Let SHAREDLLM_<FLAG> (e.g. SHAREDLLM_STORE_URL for --store-url) set each flag's default."""
    for action in parser._actions:  # argparse has no public way to list a parser's options
        flag = next((s for s in action.option_strings if s.startswith("--")), None)
        if flag is None or action.dest == "help":
            continue
        name = ENV_PREFIX + flag[2:].upper().replace("-", "_")
        action.help = f"{action.help or ''} [env {name}]".strip()
        if name not in environ:
            continue
        raw = environ[name]
        if action.nargs == 0:  # a switch
            action.default = raw.strip().lower() in TRUE_WORDS
            continue
        try:
            value = action.type(raw) if callable(action.type) else raw
        except (TypeError, ValueError):
            value = None
        if value is None or (action.choices is not None and value not in action.choices):
            # The serve parser is built before parsing: a broken environment is reported at once.
            parser.exit(2, f"sharedllm: error: environment variable {name}={raw!r} is not a valid value for {flag}\n")
        action.default = value
