"""The error vocabulary shared by the engine, the stores and the services.

Each class names one failure a caller can act on. The gRPC services map them to status
codes in one interceptor and the command line prints them as one line, so nothing below
the services needs to know about either.
"""

from __future__ import annotations


class SharedLLMError(Exception):
    """Base class of every expected failure; anything else is a bug."""


class InvalidInput(SharedLLMError):
    """A parameter or document is malformed or over a documented limit (INVALID_ARGUMENT)."""


class ContextNotFound(SharedLLMError):
    """No such context: never stored, expired, deleted, or another tenant's (NOT_FOUND)."""


class IncompatibleContext(SharedLLMError):
    """Stored for another model, adapter or format version (FAILED_PRECONDITION)."""


class DataCorruption(SharedLLMError):
    """A stored payload fails its checksum, is truncated or is missing a part (DATA_LOSS)."""


class StoreUnavailable(SharedLLMError):
    """The store cannot be reached right now; retrying later may work (UNAVAILABLE)."""


class ContextChanged(SharedLLMError):
    """A context was replaced between reading it and writing a new version of it (an append that
    lost a race); the writer reads it again and retries, and only repeated losses reach the
    caller (ABORTED)."""


class ResourceExhausted(SharedLLMError):
    """Over a capacity or concurrency limit (RESOURCE_EXHAUSTED)."""


class QuotaExceeded(ResourceExhausted):
    """A tenant's stored contexts or bytes would pass its quota (RESOURCE_EXHAUSTED, with the numbers)."""


class ModelUnavailable(SharedLLMError):
    """Model or adapter files are missing or do not match (FAILED_PRECONDITION at start-up)."""
