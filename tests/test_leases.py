"""Leases on batch documents and the reaper that hands a dead worker's document on, against a
real redis-server (the kill itself, with real workers, is in tests/test_batch.py)."""

from __future__ import annotations

import threading
import time

from sharedllm.common.batch.leases import LEASES_KEY, Lease, LeaseName, Reaper, held_by_another


def test_a_held_lease_is_renewed_and_released(make_redis_server):
    client = make_redis_server().client()
    name = LeaseName("job", 3, "summarize", "task-a")
    with Lease(client, name, "doc:3", lease_s=3) as lease:
        first = client.zscore(LEASES_KEY, name.member)
        time.sleep(1.5)  # one renewal (every lease_s / 3)
        assert client.zscore(LEASES_KEY, name.member) > first and not lease.lost.is_set()
        assert held_by_another(client, "doc:3", "summarize", "task-b")
        assert not held_by_another(client, "doc:3", "summarize", "task-a")  # its own
        assert not held_by_another(client, "doc:3", "answer", "task-b")  # the next stage, sent from inside it
    assert client.zscore(LEASES_KEY, name.member) is None  # released
    assert not held_by_another(client, "doc:3", "summarize", "task-b")


def test_an_expired_lease_is_resent_once_among_reapers_and_its_holder_learns_it(make_redis_server):
    client = make_redis_server().client()
    sent: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def resend(job_id, index, task):
        with lock:
            sent.append((job_id, index, task))

    live = Lease(client, LeaseName("job", 1, "answer", "alive"), "doc:1", lease_s=30).__enter__()
    stalled = Lease(client, LeaseName("job", 2, "compress", "dead"), "doc:2", lease_s=3)
    with stalled:
        client.zadd(LEASES_KEY, {stalled.name.member: time.time() - 1})  # as if it had stopped beating
        reapers = [Reaper(client, resend) for _ in range(4)]
        threads = [threading.Thread(target=r.reap_once) for r in reapers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sent == [("job", 2, "compress")]  # once, whatever the number of reapers
        assert stalled.lost.wait(3)  # its next renewal finds the lease gone
    live.__exit__(None, None, None)
    assert client.zcard(LEASES_KEY) == 0


def test_the_reaper_thread_runs_until_stopped(make_redis_server):
    client = make_redis_server().client()
    sent = []
    client.zadd(LEASES_KEY, {LeaseName("job", 0, "summarize", "gone").member: time.time() - 1})
    reaper = Reaper(client, lambda *args: sent.append(args), period_s=0.1).start()
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.05)
    reaper.stop()
    assert sent == [("job", 0, "summarize")]


def test_a_resend_that_fails_keeps_the_lease_due_for_the_next_pass(make_redis_server):
    client = make_redis_server().client()
    client.zadd(LEASES_KEY, {LeaseName("job", 5, "answer", "gone").member: time.time() - 1})
    attempts = []

    def resend(*args):
        attempts.append(args)
        if len(attempts) == 1:
            raise ConnectionError("the broker is restarting")

    reaper = Reaper(client, resend)
    assert reaper.reap_once() == [] and client.zcard(LEASES_KEY) == 1  # put back, due now
    assert [n.member for n in reaper.reap_once()] == [LeaseName("job", 5, "answer", "gone").member]
    assert attempts == [("job", 5, "answer")] * 2 and client.zcard(LEASES_KEY) == 0
