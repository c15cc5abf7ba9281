"""Per-tenant quotas on what a store holds, and the usage they are checked against.

Why per tenant: one client compressing in a loop must not fill the store every other tenant
shares. A server has one default quota for every tenant (`--tenant-max-contexts`,
`--tenant-max-bytes`) and may give named tenants their own (`--tenant-quotas-file`), e.g. for
tenants on different plans.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sharedllm.common.errors import InvalidInput, QuotaExceeded
from sharedllm.common.store.names import validate_name


@dataclass(frozen=True)
class Quota:
    """Limits on what one tenant stores (None: no limit)."""

    max_contexts: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_contexts", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInput(f"quota {name} must be >= 1 (or none), got {value}")

    @property
    def limited(self) -> bool:
        return self.max_contexts is not None or self.max_bytes is not None

    def check(self, tenant: str, others: TenantUsage, adding_bytes: int) -> None:
        """Raise QuotaExceeded if the tenant's other contexts (`others`: all but the one being
        written, which a write replaces) plus one of `adding_bytes` would pass a limit."""
        if self.max_contexts is not None and others.contexts + 1 > self.max_contexts:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {others.contexts} stored contexts; its quota is {self.max_contexts} "
                "(delete some or let them expire)"
            )
        if self.max_bytes is not None and others.stored_bytes + adding_bytes > self.max_bytes:
            raise QuotaExceeded(
                f"tenant {tenant!r} stores {others.stored_bytes} bytes; this context needs {adding_bytes} more "
                f"and the quota is {self.max_bytes} bytes (delete some contexts or let them expire)"
            )


@dataclass(frozen=True)
class TenantUsage:
    """What one tenant has stored: live contexts and their bytes."""

    contexts: int
    stored_bytes: int


@dataclass(frozen=True)
class TenantQuotas:
    """The quota of each tenant: its own if it has one, else the default."""

    default: Quota = field(default_factory=Quota)
    tenants: Mapping[str, Quota] = field(default_factory=dict)

    def of(self, tenant: str) -> Quota:
        return self.tenants.get(tenant, self.default)

    @classmethod
    def from_file(cls, path: Path, default: Quota) -> TenantQuotas:
        """One `TENANT [max_contexts=N] [max_bytes=N]` line per tenant (a field left out, or 0,
        is no limit for that tenant); blank lines and lines starting with # are skipped."""
        tenants: dict[str, Quota] = {}
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read the tenant quotas file {path}: {exc}") from None
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{path}:{number}"
            tenant = validate_name(fields[0], f"tenant at {where}")
            if tenant in tenants:
                raise InvalidInput(f"{where}: tenant {tenant!r} already has a quota")
            limits: dict[str, int | None] = {}
            for item in fields[1:]:
                name, _, value = item.partition("=")
                if name not in ("max_contexts", "max_bytes") or not (value.isascii() and value.isdigit()):
                    raise InvalidInput(f"{where}: expected max_contexts=N or max_bytes=N, got {item!r}")
                limits[name] = int(value) or None
            tenants[tenant] = Quota(**limits)
        return cls(default, tenants)
