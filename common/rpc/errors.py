"""Errors of the RPC layer and the one table from error classes to gRPC status codes.

The engine and the stores raise the classes of sharedllm.common.errors and know nothing of gRPC; the
services' interceptor looks the status code up here, so the mapping of docs/architecture.md
("gRPC conventions") is written down exactly once.
"""

from __future__ import annotations

import grpc

from sharedllm.common import errors


class Unauthenticated(errors.SharedLLMError):
    """No API key, or one the server does not know (UNAUTHENTICATED)."""


class ServiceUnavailable(errors.SharedLLMError):
    """The server cannot take requests yet (model loading) or any more (draining) (UNAVAILABLE)."""


STATUS_CODES: dict[type[errors.SharedLLMError], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ContextNotFound: grpc.StatusCode.NOT_FOUND,
    errors.IncompatibleContext: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DataCorruption: grpc.StatusCode.DATA_LOSS,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ContextChanged: grpc.StatusCode.ABORTED,
    errors.ModelUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ServiceUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status for `exc`: its class's entry (or its nearest base's), else INTERNAL (a bug)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL
