"""Model work off the event loop: a bounded pool of threads that stop when their caller leaves.

Why threads: the engine is blocking torch code; run on the event loop it would freeze every
other RPC, health included. Admission: at most `limit` calls run at once (the decoder batches
them: engine/scheduler.py); up to `max_queued` more wait, first come first served, for at most
`queue_timeout_s` each, and a call beyond the queue, or one that waited too long, is refused with
RESOURCE_EXHAUSTED, so a client (or its load balancer) can try another replica rather than
wait behind work of unknown length. A slot is held until the thread really finishes, so the
count of active requests is the truth even just after a cancellation.

Stopping: a generator is advanced one `next()` at a time, one token for generation, and the
worker checks the stop flag between steps; a callable gets a `should_stop` it can poll (the
compressor polls it per batch of chunks). Cancellation and deadlines reach the handler as
asyncio.CancelledError, whose `finally` raises the flag.
"""

from __future__ import annotations

import asyncio
import collections
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

    def __init__(self, limit: int, max_queued: int = 0, queue_timeout_s: float = 30.0) -> None:
        if limit < 1 or max_queued < 0 or not queue_timeout_s > 0:
            got = f"{limit}, {max_queued}, {queue_timeout_s}"
            raise ValueError(f"need limit >= 1, max_queued >= 0 and queue_timeout_s > 0, got {got}")
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self.started_total = 0
        self.refused_total = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._executor = ThreadPoolExecutor(limit, thread_name_prefix="model")

    @property
    def queued(self) -> int:
        """Calls waiting for a slot."""
        return len(self._waiting)

    async def call(self, fn: Callable[[ShouldStop], T]) -> T:
        """fn(should_stop) in a worker thread; should_stop() turns True once this call is cancelled."""
        stop = threading.Event()
        arrived = time.perf_counter()
        await self._admit()
        try:
            return await self._submit(arrived, fn, stop.is_set)
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

        arrived = time.perf_counter()
        await self._admit()
        self._submit(arrived, pump)
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

    async def _admit(self) -> None:
        """Take a slot: at once when one is free and nobody waits, else in turn from the queue."""
        if self.active < self.limit and not self._waiting:
            self.active += 1
            return
        if len(self._waiting) >= self.max_queued:
            self._refused()
            raise ResourceExhausted(
                f"the server is at its limit of {self.limit} concurrent requests and {self.max_queued} queued; "
                "retry later"
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        metrics.QUEUED.set(len(self._waiting))
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.queue_timeout_s)
        except TimeoutError:
            if not turn.done():
                self._leave(turn)
                self._refused()
                raise ResourceExhausted(
                    f"waited {self.queue_timeout_s:g} s for one of {self.limit} request slots; retry later"
                ) from None
        except asyncio.CancelledError:
            if turn.done():  # the slot was handed over as the caller left: pass it on
                self._release()
            else:
                self._leave(turn)
            raise

    def _leave(self, turn: asyncio.Future[None]) -> None:
        self._waiting.remove(turn)
        metrics.QUEUED.set(len(self._waiting))

    def _refused(self) -> None:
        self.refused_total += 1
        metrics.REFUSED.inc()

    def _submit(self, arrived: float, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run fn in a worker thread on a slot taken by _admit (released when the thread is done);
        `arrived`: when the call came, before any wait in the queue."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            metrics.QUEUE_SECONDS.observe(time.perf_counter() - arrived)
            return fn(*args)

        try:  # the caller's context goes with the work (the request's tenant, its trace's span)
            work = self._executor.submit(contextvars.copy_context().run, run)
        except RuntimeError:  # shut down between the admission and now: the slot goes back
            self._release()
            raise
        self.started_total += 1

        def finished(_work: object) -> None:
            # Released when the thread is done, not when the awaiting task is cancelled: a
            # cancelled call may still be finishing its current step.
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody counts any more
                loop.call_soon_threadsafe(self._release)

        work.add_done_callback(finished)
        return asyncio.wrap_future(work, loop=loop)

    def _release(self) -> None:
        """Hand the slot to the oldest waiting call, or free it."""
        while self._waiting:
            turn = self._waiting.popleft()
            metrics.QUEUED.set(len(self._waiting))
            if not turn.done():
                turn.set_result(None)
                return
        self.active -= 1

    def shutdown(self) -> None:
        """Stop taking work; threads still running finish their current step and exit."""
        self._executor.shutdown(wait=False, cancel_futures=True)
