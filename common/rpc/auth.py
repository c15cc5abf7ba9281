"""Optional API keys, each mapped to the tenant whose contexts it may see.

Why tenants come from keys and never from a request field: a client must not be able to name
another tenant. Keys are read from a file (not a flag, which `ps` would show) and kept only as
SHA-256 digests, so the lookup neither holds the secrets nor compares them byte by byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from sharedllm.common.errors import InvalidInput
from sharedllm.common.rpc.errors import Unauthenticated
from sharedllm.common.store import DEFAULT_TENANT, validate_name

MIN_KEY_CHARS = 16
AUTH_HEADER = "authorization"
SCHEME = "bearer "


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Tenant lookup by key. Without keys (`ApiKeys.disabled()`) every caller is the default tenant."""

    def __init__(self, tenants: dict[str, str] | None) -> None:
        """tenants: key -> tenant, or None to turn authentication off."""
        self._by_digest = None if tenants is None else {_digest(k): t for k, t in tenants.items()}

    @classmethod
    def disabled(cls) -> ApiKeys:
        return cls(None)

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        """One `TENANT KEY` pair per line; blank lines and lines starting with # are skipped."""
        tenants: dict[str, str] = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{path}:{number}"
            if len(fields) != 2:
                raise InvalidInput(f"{where}: expected `TENANT KEY`, got {len(fields)} fields")
            tenant, key = fields
            validate_name(tenant, f"tenant at {where}")
            if len(key) < MIN_KEY_CHARS:
                raise InvalidInput(f"{where}: API keys need at least {MIN_KEY_CHARS} characters")
            if key in tenants:
                raise InvalidInput(f"{where}: this key is already given to tenant {tenants[key]!r}")
            tenants[key] = tenant
        if not tenants:
            raise InvalidInput(f"{path} holds no API keys")
        return cls(tenants)

    @property
    def enabled(self) -> bool:
        return self._by_digest is not None

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant of the `authorization: Bearer KEY` header; raises Unauthenticated."""
        if self._by_digest is None:
            return DEFAULT_TENANT
        values = [v for k, v in metadata or () if k == AUTH_HEADER]
        if not values:
            raise Unauthenticated("missing API key: send the header `authorization: Bearer <key>`")
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        if not value.lower().startswith(SCHEME):
            raise Unauthenticated("the authorization header must read `Bearer <key>`")
        tenant = self._by_digest.get(_digest(value[len(SCHEME) :].strip()))
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant
