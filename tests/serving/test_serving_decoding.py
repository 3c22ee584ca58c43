"""The fair decode pool: the order jobs run in across tenants, errors, cancelling, shutdown."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from spurguard.server.errors import InvalidInput, Unavailable
from spurguard.server.serving.decoding import DecodePool, Tenant

TIMEOUT = 10


@pytest.fixture
def pool() -> Iterator[DecodePool]:
    """One worker, so the order jobs run in is the order the pool chose."""
    pool = DecodePool(1, name="test-decode")
    yield pool
    pool.shutdown()


def hold(pool: DecodePool) -> threading.Event:
    """Keep the pool's one worker busy until the returned event is set, so jobs queue up."""
    release, started = threading.Event(), threading.Event()
    pool.submit(Tenant(), 0, lambda: (started.set(), release.wait(TIMEOUT)))
    assert started.wait(TIMEOUT)
    return release


def run_order(pool: DecodePool, jobs: list[tuple[str, Tenant, float]]) -> list[str]:
    """Queue the jobs (name, tenant, cost) behind a held worker, then let it go: the names as they ran."""
    ran: list[str] = []
    release = hold(pool)
    futures = [pool.submit(tenant, cost, ran.append, name) for name, tenant, cost in jobs]
    release.set()
    for future in futures:
        future.result(TIMEOUT)
    return ran


def test_a_newcomer_runs_before_a_flooding_tenants_backlog(pool: DecodePool) -> None:
    flood, newcomer = Tenant(), Tenant()
    jobs = [(f"flood{i}", flood, 100.0) for i in range(10)] + [("newcomer", newcomer, 100.0)]
    assert run_order(pool, jobs).index("newcomer") == 1  # first-come-first-served: 10


def test_shares_are_equal_work_not_equal_job_counts(pool: DecodePool) -> None:
    """A tenant whose jobs cost 10x as much runs one job per ten of the other's."""
    heavy, light = Tenant(), Tenant()
    jobs = [(f"H{i}", heavy, 1000.0) for i in range(3)] + [(f"L{i}", light, 100.0) for i in range(30)]
    expected = []
    for h in range(3):
        expected += [f"H{h}"] + [f"L{i}" for i in range(10 * h, 10 * h + 10)]
    assert run_order(pool, jobs) == expected


def test_a_tenant_does_not_bank_its_idle_time(pool: DecodePool) -> None:
    """A tenant arriving after the pool worked for others starts at the pool's present: it
    alternates with them instead of running all its jobs first."""
    busy, late = Tenant(), Tenant()
    run_order(pool, [(f"early{i}", busy, 100.0) for i in range(50)])
    jobs = [item for i in range(10) for item in ((f"busy{i}", busy, 100.0), (f"late{i}", late, 100.0))]
    ran = run_order(pool, jobs)
    longest_late_run = max(len(run) for run in "".join("L" if n.startswith("late") else " " for n in ran).split())
    assert longest_late_run <= 2, ran


def test_a_tenant_over_its_share_waits_while_others_are_in_flight() -> None:
    """Two tenants in flight on one worker each own half of it: after a 0.3 s job the heavy one
    has used 0.6 s of its share and waits (~0.25 s) though the worker is free, while the other's
    job runs at once; when the other's request ends, the heavy one goes on at once."""
    pool = DecodePool(1)
    heavy, other = Tenant(), Tenant()
    ran: dict[str, tuple[float, float]] = {}

    def job(name: str, seconds: float) -> None:
        started = time.monotonic()
        time.sleep(seconds)
        ran[name] = (started, time.monotonic())

    try:
        with pool.serving(heavy):
            with pool.serving(other):
                first, second = (pool.submit(heavy, 1.0, job, name, 0.3) for name in ("first", "second"))
                first.result(TIMEOUT)
                pool.submit(other, 1.0, job, "other", 0.0).result(TIMEOUT)
                assert ran["other"][0] - ran["first"][1] < 0.15 and not second.done()
                time.sleep(0.1)
                assert not second.done()  # held back with the worker idle
                left = time.monotonic()
            second.result(TIMEOUT)
            assert ran["second"][0] - left < 0.15
            alone = [pool.submit(heavy, 1.0, job, name, 0.3) for name in ("third", "fourth")]
            for future in alone:
                future.result(TIMEOUT)
            assert ran["fourth"][0] - ran["third"][1] < 0.15  # alone: no waiting
    finally:
        pool.shutdown()


def test_a_tenant_alone_uses_every_worker() -> None:
    pool = DecodePool(2)
    both = threading.Barrier(2, timeout=TIMEOUT)  # only passes if the two jobs run at once
    try:
        tenant = Tenant()
        futures = [pool.submit(tenant, 1.0, both.wait) for _ in range(2)]
        assert sorted(future.result(TIMEOUT) for future in futures) == [0, 1]
    finally:
        pool.shutdown()


def test_errors_reach_the_caller_and_a_cancelled_callers_job_never_runs(pool: DecodePool) -> None:
    ran: list[str] = []

    def fail() -> None:
        raise InvalidInput("bad image")

    async def main() -> None:
        with pytest.raises(InvalidInput, match="bad image"):
            await pool.run(Tenant(), 1.0, fail)
        release = hold(pool)
        gone = asyncio.create_task(pool.run(Tenant(), 1.0, ran.append, "gone"))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0)
        release.set()
        assert await pool.run(Tenant(), 1.0, ran.append, "after") is None

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert ran == ["after"]


def test_shutdown_fails_queued_jobs_and_refuses_new_ones() -> None:
    pool = DecodePool(1, name="test-shutdown")
    release = hold(pool)
    queued = pool.submit(Tenant(), 1.0, lambda: "never")
    pool.shutdown()
    with pytest.raises(Unavailable, match="shutting down"):
        queued.result(TIMEOUT)
    with pytest.raises(Unavailable, match="shutting down"):
        pool.submit(Tenant(), 1.0, lambda: None)
    release.set()
    for thread in threading.enumerate():
        if thread.name.startswith("test-shutdown"):
            thread.join(TIMEOUT)
            assert not thread.is_alive()
    with pytest.raises(InvalidInput, match="decode workers must be >= 1"):
        DecodePool(0)
