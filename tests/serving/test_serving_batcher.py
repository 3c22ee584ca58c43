"""The dynamic batcher with a fake forward function: batching, delay, order, per-item errors."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from spurguard.server.errors import InvalidInput, Unavailable
from spurguard.server.serving.batcher import Batcher, BatchStats


class FakeForward:
    """Doubles each item; records batches and the thread they ran on; fails items < 0."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        return [InvalidInput(f"item {i} is negative") if i < 0 else 2 * i for i in items]


def run(coroutine):  # noqa: ANN001, ANN201 - a tiny asyncio.run with a timeout
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_concurrent_submissions_share_batches_up_to_the_max_size() -> None:
    forward = FakeForward()
    stats: list[BatchStats] = []

    async def main() -> list[int | BaseException]:
        batcher = Batcher(forward, max_batch_size=4, max_delay_s=0.05, on_batch=stats.append)
        try:
            return await batcher.submit_many(list(range(10)))
        finally:
            await batcher.close()

    assert run(main()) == [2 * i for i in range(10)]
    assert [len(b) for b in forward.batches] == [4, 4, 2]
    assert [s.size for s in stats] == [4, 4, 2]
    assert threading.get_ident() not in forward.threads  # never on the event loop's thread


def test_results_keep_submission_order_across_concurrent_callers() -> None:
    forward = FakeForward(seconds=0.01)

    async def caller(batcher: Batcher[int, int], start: int) -> list[int]:
        out = []
        for i in range(start, start + 5):
            out.append(await batcher.submit(i))
            await asyncio.sleep(0)
        return out

    async def main() -> list[list[int]]:
        batcher = Batcher(forward, max_batch_size=8, max_delay_s=0.005)
        try:
            return await asyncio.gather(*(caller(batcher, 100 * c) for c in range(6)))
        finally:
            await batcher.close()

    results = run(main())
    assert results == [[2 * i for i in range(100 * c, 100 * c + 5)] for c in range(6)]
    assert max(len(b) for b in forward.batches) > 1  # concurrent callers did share forward passes
    assert sorted(i for b in forward.batches for i in b) == sorted(i for c in range(6) for i in range(100 * c, 100 * c + 5))


def test_a_lone_item_waits_at_most_the_max_delay() -> None:
    forward = FakeForward()
    stats: list[BatchStats] = []

    async def main() -> float:
        batcher = Batcher(forward, max_batch_size=64, max_delay_s=0.2, on_batch=stats.append)
        try:
            started = time.monotonic()
            assert await batcher.submit(1) == 2
            return time.monotonic() - started
        finally:
            await batcher.close()

    elapsed = run(main())
    assert 0.19 <= elapsed < 1.0
    assert stats[0].size == 1 and 0.19 <= stats[0].queue_s[0] < 1.0


def test_zero_delay_does_not_wait_for_company() -> None:
    async def main() -> float:
        batcher = Batcher(FakeForward(), max_batch_size=64, max_delay_s=0.0)
        try:
            started = time.monotonic()
            await batcher.submit(1)
            return time.monotonic() - started
        finally:
            await batcher.close()

    assert run(main()) < 0.1


def test_items_arriving_during_a_forward_pass_form_the_next_batch_without_delay() -> None:
    forward = FakeForward(seconds=0.2)
    stats: list[BatchStats] = []

    async def main() -> None:
        batcher = Batcher(forward, max_batch_size=8, max_delay_s=5.0, on_batch=stats.append)
        try:
            first = asyncio.ensure_future(batcher.submit_many(list(range(8))))  # full: runs at once
            await asyncio.sleep(0.05)  # the full batch is computing
            rest = await batcher.submit_many([8, 9, 10])
            assert rest == [16, 18, 20]
            await first
        finally:
            await batcher.close()

    started = time.monotonic()
    run(main())
    # the 3 late items waited for the running batch (~0.2 s), not for the 5 s delay
    assert time.monotonic() - started < 2.0
    assert [s.size for s in stats] == [8, 3]


class MeetingForward(FakeForward):
    """Each batch waits until `parties` batches are computing at once (a remote forward waiting on
    the wire); a batcher that runs fewer at once breaks the barrier, failing those batches."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=2.0)

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.barrier.wait()
        return super().__call__(items)


@pytest.mark.parametrize("in_flight", [2, 4])
def test_max_in_flight_batches_compute_at_once(in_flight: int) -> None:
    forward = MeetingForward(in_flight)

    async def main() -> list[int | BaseException]:
        batcher = Batcher(forward, max_batch_size=2, max_delay_s=0.0, max_in_flight=in_flight)
        try:
            return await batcher.submit_many(list(range(2 * in_flight)))
        finally:
            await batcher.close()

    assert run(main()) == [2 * i for i in range(2 * in_flight)]
    assert len(forward.batches) == in_flight and len(forward.threads) == in_flight


def test_one_in_flight_runs_batches_one_after_another() -> None:
    forward = MeetingForward(2)

    async def main() -> list[int | BaseException]:
        batcher = Batcher(forward, max_batch_size=2, max_delay_s=0.0)
        try:
            return await batcher.submit_many(list(range(4)))
        finally:
            await batcher.close()

    results = run(main())
    assert all(isinstance(r, threading.BrokenBarrierError) for r in results)  # the two never met


def test_close_fails_the_items_of_every_batch_in_flight() -> None:
    release = threading.Event()

    def stuck(items: list[int]) -> list[int | BaseException]:
        release.wait(5.0)
        return [2 * i for i in items]

    async def main() -> list[int | BaseException]:
        batcher = Batcher(stuck, max_batch_size=1, max_delay_s=0.0, max_in_flight=3)
        waiting = asyncio.ensure_future(batcher.submit_many([1, 2, 3, 4]))
        await asyncio.sleep(0.1)  # three batches computing, one queued
        closing = asyncio.ensure_future(batcher.close())
        results = await waiting
        release.set()
        await closing
        return results

    assert all(isinstance(r, Unavailable) for r in run(main()))


def test_a_failing_item_does_not_fail_its_batch() -> None:
    forward = FakeForward()

    async def main() -> list[int | BaseException]:
        batcher = Batcher(forward, max_batch_size=8, max_delay_s=0.01)
        try:
            return await batcher.submit_many([1, -1, 3])
        finally:
            await batcher.close()

    results = run(main())
    assert len(forward.batches) == 1
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], InvalidInput) and "item -1" in str(results[1])


def test_a_failing_forward_fails_each_item_of_its_batch_and_the_batcher_goes_on() -> None:
    calls = []

    def forward(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return [i + 1 for i in items]

    async def main() -> tuple[list[int | BaseException], int]:
        batcher = Batcher(forward, max_batch_size=2, max_delay_s=0.01)
        try:
            failed = await batcher.submit_many([1, 2])
            return failed, await batcher.submit(5)
        finally:
            await batcher.close()

    failed, later = run(main())
    assert all(isinstance(r, RuntimeError) for r in failed)
    assert later == 6


def test_a_cancelled_caller_is_dropped_before_its_batch_runs() -> None:
    forward = FakeForward()

    async def main() -> None:
        batcher = Batcher(forward, max_batch_size=8, max_delay_s=0.1)
        try:
            gone = asyncio.ensure_future(batcher.submit(7))
            await asyncio.sleep(0.01)
            gone.cancel()
            assert await batcher.submit(1) == 2
        finally:
            await batcher.close()

    run(main())
    assert forward.batches == [[1]]


def test_close_fails_queued_items_and_refuses_new_ones() -> None:
    async def main() -> None:
        batcher = Batcher(FakeForward(), max_batch_size=8, max_delay_s=10.0)
        queued = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.01)
        await batcher.close()
        with pytest.raises(Unavailable):
            await queued
        with pytest.raises(Unavailable):
            await batcher.submit(2)

    run(main())


@pytest.mark.parametrize("size, delay, in_flight", [(0, 0.1, 1), (4, -1.0, 1), (4, 0.1, 0)])
def test_limits_are_checked(size: int, delay: float, in_flight: int) -> None:
    with pytest.raises(InvalidInput):
        Batcher(FakeForward(), max_batch_size=size, max_delay_s=delay, max_in_flight=in_flight)
