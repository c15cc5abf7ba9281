"""Transport security: the files TLS and mutual TLS are made of, and when plaintext is a risk.

Why a module of its own, without grpc: the command-line clients parse their TLS flags into a
ClientTls before they dial anything, and the parsing layer must stay cheap to import. The
credentials themselves are built where the channel or the port is made (client.py, server.py),
from the bytes read here, so a missing or garbled file is one clear ConfigError instead of a
handshake that fails later with a cryptic log line.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from sharedllm.common.config import ConfigError

LOOPBACK_NAMES = frozenset({"localhost"})


def read_pem(path: Path, what: str) -> bytes:
    """The contents of a PEM file; ConfigError naming `what` and the path if it is unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"the {what} {path} is not a PEM file (no -----BEGIN line)")
    return data


def check_key_pair(cert: Path | None, key: Path | None, flags: str) -> None:
    """A certificate is useless without its private key and the other way round: both or neither."""
    if (cert is None) != (key is None):
        given, missing = ("certificate", "private key") if key is None else ("private key", "certificate")
        raise ConfigError(
            f"TLS needs a certificate and its private key ({flags}); got the {given} without the {missing}"
        )


@dataclass(frozen=True)
class ClientTls:
    """How a client verifies a service and, for mutual TLS, proves who it is.

    ca: PEM roots the server's certificate must chain to (None: gRPC's default roots, for a
    certificate from a public CA). cert and key: the client's own certificate chain and key,
    for a server that requires one (both or neither). server_name: the name the server's
    certificate must carry, when the target does not say it (e.g. replicas listed by address).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        check_key_pair(self.cert, self.key, "--tls-cert and --tls-key")

    def root_certificates(self) -> bytes | None:
        return read_pem(self.ca, "TLS CA file (--tls-ca)") if self.ca is not None else None

    def key_pair(self) -> tuple[bytes | None, bytes | None]:
        """(private key, certificate chain) to present, or (None, None) without a client certificate."""
        if self.cert is None or self.key is None:
            return None, None
        return read_pem(self.key, "TLS private key (--tls-key)"), read_pem(self.cert, "TLS certificate (--tls-cert)")


def is_loopback(host: str) -> bool:
    """Whether `host` (as --host takes it: a name, an address, or an IPv6 address in brackets)
    reaches this machine only."""
    name = host.strip().removeprefix("[").removesuffix("]")
    if name.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to an address others can reach


def plaintext_warning(host: str, tls: bool) -> str | None:
    """The warning a server should log at start, or None: plaintext is fine on loopback only."""
    if tls or is_loopback(host):
        return None
    return (
        f"listening on {host} without TLS: API keys and documents cross the network unencrypted; "
        "set --tls-cert and --tls-key (SHAREDLLM_TLS_CERT, SHAREDLLM_TLS_KEY) to encrypt them"
    )
