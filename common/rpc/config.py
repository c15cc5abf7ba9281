"""Server configuration from flags, with every flag also settable as SHAREDLLM_<FLAG> in the environment.

Why both: a developer types flags; a container sets environment variables. Flags win over the
environment, which wins over the built-in default; `--help` names the variable of each flag.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.cli.embedded import add_evidence_arguments, add_model_arguments, evidence_settings
from common.config import TreeConfig
from common.engine.engine import Limits
from common.engine.evidence import EvidenceSettings
from common.errors import InvalidInput
from common.rpc.auth import ApiKeys
from common.store.decoded_cache import DEFAULT_CACHE_BYTES
from common.training.cli import add_tree_arguments, given_tree_flags, tree_config

ENV_PREFIX = "SHAREDLLM_"
MIB = 1 << 20
TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    store_url: str
    model: str | None
    adapter: str | None
    device: str | None
    dtype: str
    tree_config: TreeConfig | None  # a fresh, untrained adapter with this config instead of an adapter file
    limits: Limits | None  # None: the engine's default for the model and tree config
    max_document_bytes: int
    max_message_bytes: int
    max_concurrent: int
    default_ttl_s: float | None  # None: contexts never expire unless the client asks
    decoded_cache_bytes: int  # verified nodes kept decoded for repeat questions; 0: none
    evidence: EvidenceSettings  # the decoder's default evidence budget and choice (requests may override)
    api_keys: ApiKeys
    shutdown_grace_s: float
    drain_delay_s: float
    health_interval_s: float
    torch_threads: int | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        for name in ("max_document_bytes", "max_message_bytes", "max_concurrent", "max_document_tokens"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.decoded_cache_mib < 0:
            raise InvalidInput(f"--decoded-cache-mib must be >= 0, got {args.decoded_cache_mib}")
        tree = given_tree_flags(args)
        if tree and args.adapter:
            raise InvalidInput(f"--adapter brings its own tree config; drop {', '.join(sorted(tree))}")
        for name in ("default_ttl_s", "shutdown_grace_s", "drain_delay_s", "health_interval_s"):
            value = getattr(args, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidInput(f"--{name.replace('_', '-')} must be finite and >= 0, got {value}")
        return cls(
            host=args.host,
            port=args.port,
            store_url=args.store_url,
            model=args.model,
            adapter=args.adapter,
            device=args.device,
            dtype=args.dtype,
            tree_config=tree_config(args, TreeConfig()) if tree else None,
            limits=None if args.max_document_tokens is None else Limits(max_document_tokens=args.max_document_tokens),
            max_document_bytes=args.max_document_bytes,
            max_message_bytes=args.max_message_bytes,
            max_concurrent=args.max_concurrent,
            default_ttl_s=args.default_ttl_s or None,
            decoded_cache_bytes=args.decoded_cache_mib * MIB,
            evidence=evidence_settings(args),
            api_keys=ApiKeys.from_file(args.api_keys_file) if args.api_keys_file else ApiKeys.disabled(),
            shutdown_grace_s=args.shutdown_grace_s,
            drain_delay_s=args.drain_delay_s,
            health_interval_s=max(args.health_interval_s, 0.05),
            torch_threads=args.torch_threads,
        )


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    """Every server flag, then the environment's defaults for them."""
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="[::]", help="address to listen on")
    net.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    net.add_argument("--max-message-bytes", type=int, default=8 * MIB, help="largest message either way")
    net.add_argument("--max-concurrent", type=int, default=4, help="Compress/Generate calls at once; more are refused")
    net.add_argument("--api-keys-file", type=Path, help="`TENANT KEY` per line; unset: no authentication")
    net.add_argument("--shutdown-grace-s", type=float, default=30.0, help="how long SIGTERM waits for calls")
    net.add_argument("--drain-delay-s", type=float, default=0.0, help="NOT_SERVING this long before refusing calls")
    net.add_argument("--health-interval-s", type=float, default=2.0, help="how often the store is pinged")
    net.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    store = parser.add_argument_group("store")
    store.add_argument("--store-url", default="redis://localhost:6379/0", help="redis://, rediss:// or memory://")
    store.add_argument("--default-ttl-s", type=float, default=24 * 3600.0, help="context lifetime; 0: no expiry")
    store.add_argument("--max-document-bytes", type=int, default=64 * MIB, help="largest streamed document")
    store.add_argument(
        "--decoded-cache-mib",
        type=int,
        default=DEFAULT_CACHE_BYTES // MIB,
        help="verified context nodes kept decoded in memory for repeat questions; 0: none",
    )
    model = parser.add_argument_group("model")
    add_model_arguments(model)
    model.add_argument("--torch-threads", type=int, help="CPU threads for torch (default: torch's choice)")
    add_evidence_arguments(
        parser.add_argument_group("evidence (decoder defaults; requests may override)"), passage_flags=True
    )
    add_tree_arguments(parser.add_argument_group("fresh untrained adapter (instead of an adapter file)"), TreeConfig())
    apply_env_defaults(parser)


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
            # Every command's parser is built at start-up: a broken environment is reported whatever runs.
            parser.exit(2, f"sharedllm: error: environment variable {name}={raw!r} is not a valid value for {flag}\n")
        action.default = value
