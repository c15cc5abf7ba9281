"""What a tenant or a context id may be, and how context ids are made.

A module of its own because both the store interface (base.py: every key it builds) and the
quotas (quota.py: the tenants a quotas file names) check names, and base.py imports quota.py:
with the rule here, each imports it and neither imports the other to reach it.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from sharedllm.common.errors import InvalidInput

NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
DEFAULT_TENANT = "default"
_CONTENT_ID_DOMAIN = b"sharedllm.v1 content context id\0"


def validate_name(value: object, what: str) -> str:
    """A context id or tenant: 1-128 characters of [A-Za-z0-9_-], safe inside any store key."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        shown = repr(value)[:80]
        raise InvalidInput(f"{what} must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'; got {shown}")
    return value


def new_context_id() -> str:
    """An unguessable id: 192 random bits, 32 characters."""
    return secrets.token_urlsafe(24)


def content_context_id(tenant: str, canonical: bytes) -> str:
    """A reproducible id for `canonical` bytes (e.g. model + adapter fingerprints + token ids).

    Salted by tenant, so the same document gives different ids to different tenants and an id
    says nothing across tenants. SHA-256, never Python's `hash()`, which changes per process.
    """
    validate_name(tenant, "tenant")
    return hashlib.sha256(_CONTENT_ID_DOMAIN + tenant.encode() + b"\0" + canonical).hexdigest()
