"""Admission in front of the model (rpc/workers.py): a bounded queue, first come first served.

The pool alone, on an event loop, with work that waits for the test's signal: no model, so the
order of events is exact. The limits the services ship with are checked as users get them.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from grpc_stack import server_config

from sharedllm.cli.server_options import ServerArguments
from sharedllm.common.errors import ResourceExhausted
from sharedllm.common.rpc.workers import WorkerPool
from sharedllm.decoder_service import DEFAULT_MAX_CONCURRENT


def held(release: threading.Event, started: list[str], name: str):
    def work(should_stop) -> str:
        started.append(name)
        release.wait(10)
        return name

    return work


def test_waiting_calls_start_in_arrival_order_and_none_starves():
    async def scenario() -> tuple[list[str], list[str]]:
        pool = WorkerPool(limit=1, max_queued=3, queue_timeout_s=10)
        gates = {name: threading.Event() for name in "ABCD"}
        started: list[str] = []
        tasks = []
        for name in "ABCD":
            tasks.append(asyncio.create_task(pool.call(held(gates[name], started, name))))
            await asyncio.sleep(0.05)  # arrive in this order
        assert pool.active == 1 and pool.queued == 3
        for name in "ABCD":  # each finishing call hands its slot to the oldest waiting one
            gates[name].set()
            await asyncio.sleep(0.1)
        done = [await task for task in tasks]
        pool.shutdown()
        return started, done

    started, done = asyncio.run(scenario())
    assert started == done == list("ABCD")


def test_a_full_queue_refuses_and_a_long_wait_is_refused():
    async def scenario() -> None:
        pool = WorkerPool(limit=1, max_queued=1, queue_timeout_s=0.3)
        gate = threading.Event()
        running = asyncio.create_task(pool.call(held(gate, [], "A")))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(pool.call(held(gate, [], "B")))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="1 queued"):
            await pool.call(held(gate, [], "C"))  # the queue is full: at once
        with pytest.raises(ResourceExhausted, match=r"waited 0\.3 s"):
            await waiting
        assert (pool.queued, pool.refused_total) == (0, 2)
        gate.set()
        assert await running == "A"
        await asyncio.sleep(0.05)
        assert pool.active == 0  # nothing leaked: every slot came back
        pool.shutdown()

    asyncio.run(scenario())


def test_a_caller_leaving_the_queue_gives_its_turn_away():
    async def scenario() -> list[str]:
        pool = WorkerPool(limit=1, max_queued=2, queue_timeout_s=10)
        gate = threading.Event()
        started: list[str] = []
        running = asyncio.create_task(pool.call(held(gate, started, "A")))
        await asyncio.sleep(0.05)
        leaving = asyncio.create_task(pool.call(held(gate, started, "B")))
        staying = asyncio.create_task(pool.call(held(gate, started, "C")))
        await asyncio.sleep(0.05)
        leaving.cancel()  # a client's deadline passed while it waited
        await asyncio.sleep(0.05)
        assert pool.queued == 1
        gate.set()
        await running, await staying
        pool.shutdown()
        return started

    assert asyncio.run(scenario()) == ["A", "C"]


def test_the_shipped_limits():
    """What `sharedllm serve decoder` admits with no flags: 16 answers batched, 32 waiting, each
    for at most 30 s; without a service default (the tests' servers), NetworkSettings' 4 and 8."""
    import argparse

    arguments = ServerArguments(default_port=0, default_concurrent=DEFAULT_MAX_CONCURRENT)
    parser = argparse.ArgumentParser()
    arguments.add_arguments(parser, environ={})
    network = arguments.from_args(parser.parse_args([])).network
    assert (network.max_concurrent, network.max_queued, network.queue_timeout_s) == (16, 32, 30.0)
    plain = server_config().network
    assert (plain.max_concurrent, plain.max_queued, plain.queue_timeout_s) == (4, 8, 30.0)
