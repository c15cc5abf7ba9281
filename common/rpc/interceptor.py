"""One server interceptor for the product's services: authenticate, then map errors to statuses.

Why here and not in the servicers: every RPC gets the same treatment without a line of it in
the services, which stay pure conversions. The tenant of the caller's API key is handed to the
servicer through a context variable (each RPC runs in its own asyncio task, hence its own copy
of the context). Health and reflection pass through untouched, so probes need no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

import grpc

from sharedllm.common.errors import SharedLLMError
from sharedllm.common.rpc.auth import ApiKeys
from sharedllm.common.rpc.errors import status_code
from sharedllm.common.telemetry import metrics

log = logging.getLogger(__name__)

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("sharedllm_tenant")


def current_tenant() -> str:
    """The tenant of the RPC being served (set by ServiceInterceptor before the servicer runs)."""
    return _tenant.get()


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, services: Collection[str], api_keys: ApiKeys) -> None:
        """services: full names (`sharedllm.v1.DecoderService`) whose methods are guarded."""
        self._services = frozenset(services)
        self._api_keys = api_keys
        # Set by the server when it stops taking calls: a call cancelled from then on was cut short
        # by the shutdown (or its caller left during it), worth a WARNING rather than a routine line.
        self.shutting_down = False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.rsplit("/", 2)[-2] if handler_call_details.method else ""
        if handler is None or service not in self._services:
            return handler
        return self._wrap(handler, handler_call_details.method)

    @contextlib.asynccontextmanager
    async def _guard(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        """Authenticate, map errors to statuses, and count, time and log the call: one line, at INFO,
        or at WARNING for a call cancelled while the server shuts down (no traceback: not a bug)."""
        name = method.rsplit("/", 1)[-1]
        started = time.perf_counter()
        code, detail, level = grpc.StatusCode.OK, "", logging.INFO
        metrics.IN_FLIGHT.labels(name).inc()
        try:
            _tenant.set(self._api_keys.tenant(context.invocation_metadata()))
            yield
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise  # the servicer already chose a status
        except SharedLLMError as exc:
            code = status_code(exc)
            detail = f": {exc}"
            if code == grpc.StatusCode.DATA_LOSS:
                metrics.INTEGRITY_FAILURES.inc()
            await context.abort(code, str(exc))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            if self.shutting_down:
                detail, level = ": cancelled during the server's shutdown", logging.WARNING
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed with an unexpected error", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log")
        finally:
            seconds = time.perf_counter() - started
            metrics.IN_FLIGHT.labels(name).dec()
            metrics.REQUESTS.labels(name, code.name).inc()
            metrics.REQUEST_SECONDS.labels(name).observe(seconds)
            fields = {"method": name, "code": code.name, "seconds": round(seconds, 4)}
            log.log(level, "%s -> %s in %.3f s%s", method, code.name, seconds, detail, extra=fields)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The same handler with its behaviour run inside `_guard`, for each of the four kinds."""
        codecs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else handler.unary_stream

            async def streaming(request, context):
                async with self._guard(context, method):
                    async for response in inner(request, context):
                        yield response

            if handler.request_streaming:
                return grpc.stream_stream_rpc_method_handler(streaming, **codecs)
            return grpc.unary_stream_rpc_method_handler(streaming, **codecs)

        inner = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(request, context):
            async with self._guard(context, method):
                return await inner(request, context)

        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary, **codecs)
        return grpc.unary_unary_rpc_method_handler(unary, **codecs)
