"""Model work off the event loop: a bounded pool of threads that stop when their caller leaves.

Why threads: the engine is blocking torch code; run on the event loop it would freeze every
other RPC, health included. Why a hard limit answered at once with RESOURCE_EXHAUSTED instead
of a queue: a client (or its load balancer) can try another replica now, rather than wait
behind work of unknown length. A slot is held until the thread really finishes, so the count
of active requests is the truth even just after a cancellation.

Stopping: a generator is advanced one `next()` at a time, one token for generation, and the
worker checks the stop flag between steps; a callable gets a `should_stop` it can poll (the
compressor polls it per batch of chunks). Cancellation and deadlines reach the handler as
asyncio.CancelledError, whose `finally` raises the flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sharedllm.common.errors import ResourceExhausted
from sharedllm.common.telemetry import metrics

T = TypeVar("T")
ShouldStop = Callable[[], bool]

_ITEM, _ERROR, _END = range(3)


class Stopped(Exception):
    """Raised inside a worker to abandon work whose caller has gone."""


class WorkerPool:
    """At most `limit` concurrent model calls; all methods are called on the event loop."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the concurrency limit must be >= 1, got {limit}")
        self.limit = limit
        self.active = 0
        self.started_total = 0
        self._executor = ThreadPoolExecutor(limit, thread_name_prefix="model")

    async def call(self, fn: Callable[[ShouldStop], T]) -> T:
        """fn(should_stop) in a worker thread; should_stop() turns True once this call is cancelled."""
        stop = threading.Event()
        try:
            return await self._submit(fn, stop.is_set)
        finally:
            stop.set()

    async def iterate(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """The items of make()'s iterator, produced in a worker thread and handed over as they come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        stop = threading.Event()

        def send(kind: int, value: Any) -> None:
            if not stop.is_set():
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
                except RuntimeError:  # the loop closed under us: nobody is listening any more
                    stop.set()

        def pump() -> None:
            try:
                iterator = make()
                try:
                    for item in iterator:
                        send(_ITEM, item)
                        if stop.is_set():
                            break
                finally:
                    close = getattr(iterator, "close", None)
                    if close is not None:
                        close()
            except BaseException as exc:  # handed to the caller, which raises it
                send(_ERROR, exc)
            else:
                send(_END, None)

        self._submit(pump)
        try:
            while True:
                kind, value = await queue.get()
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise value
                yield value
        finally:
            stop.set()

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        if self.active >= self.limit:
            raise ResourceExhausted(f"the server is at its limit of {self.limit} concurrent requests; retry later")
        loop = asyncio.get_running_loop()
        # The caller's context goes with the work (the request's tenant, its trace's current span).
        queued = time.perf_counter()

        def run() -> T:
            metrics.QUEUE_SECONDS.observe(time.perf_counter() - queued)
            return fn(*args)

        work = self._executor.submit(contextvars.copy_context().run, run)
        self.active += 1
        self.started_total += 1

        def finished(_work: object) -> None:
            # Released when the thread is done, not when the awaiting task is cancelled: a
            # cancelled call may still be finishing its current step.
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody counts any more
                loop.call_soon_threadsafe(self._release)

        work.add_done_callback(finished)
        return asyncio.wrap_future(work, loop=loop)

    def _release(self) -> None:
        self.active -= 1

    def shutdown(self) -> None:
        """Stop taking work; threads still running finish their current step and exit."""
        self._executor.shutdown(wait=False, cancel_futures=True)
