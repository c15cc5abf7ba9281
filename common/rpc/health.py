"""grpc.health.v1 that tells the truth: SERVING only while the model is ready and the store answers.

States: NOT_SERVING from start-up until the model is loaded and warmed; then, every
`interval_s`, SERVING if the store answers and NOT_SERVING if not (Redis lost, or still loading
its dataset, and back again when it is ready; for a service that stores contexts, also a Redis
with no room for one); NOT_SERVING for good once shutdown begins, so load balancers stop
sending work while in-flight calls drain. The overall status ("") and each service's status
move together, because a service here is useless without its model and its store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from sharedllm.common.store import ContextStore

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self, services: Sequence[str], interval_s: float, *, writes: bool = False) -> None:
        """writes: the service stores contexts, so a store with no room for one is not serving."""
        self.servicer = health.aio.HealthServicer()
        self._names = ("", *services)
        self._interval_s = interval_s
        self._writes = writes
        self._status: int | None = None

    async def set(self, status: int) -> None:
        if status != self._status:
            log.info("health: %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            self._status = status
        for name in self._names:
            await self.servicer.set(name, status)

    async def follow(self, store: ContextStore) -> None:
        """Ping the store forever, reporting SERVING or NOT_SERVING (run as a task; cancel to stop)."""
        while True:
            await self.set(SERVING if await self._store_answers(store) else NOT_SERVING)
            await asyncio.sleep(self._interval_s)

    async def _store_answers(self, store: ContextStore) -> bool:
        try:
            ping = functools.partial(store.ping, writes=self._writes)
            await asyncio.wait_for(asyncio.to_thread(ping), timeout=max(self._interval_s, 1.0))
        except Exception as exc:  # whatever stops the store from answering means it is not serving
            if self._status != NOT_SERVING:
                log.warning("store %s does not answer: %s", store.url, exc)
            return False
        return True

    async def shut_down(self) -> None:
        """NOT_SERVING for every name, permanently (later `set` calls are ignored)."""
        log.info("health: NOT_SERVING (shutting down)")
        await self.servicer.enter_graceful_shutdown()
