"""The decode workers every request shares, scheduled so that no request starves the others.

Why: decoding is the one step whose cost a client controls (a small file can claim millions of
pixels). On one FIFO thread pool, the 24 heavy images of one request held every other client's
one-image Score behind them for seconds. Here each request (a Score or ModelInfer call) or stream
(ScoreStream) is a `Tenant`, and two rules share the workers:

- Order: jobs run in start-time fair queuing order (Goyal et al., SIGCOMM 1996) weighted by each
  job's cost (pixels decoded plus bytes read, known from the header before any work): while
  several tenants have work queued, each gets an equal share of the decoding, however much it
  sends, and a newcomer's job waits for nothing but the jobs already running.
- Share: fair queuing alone hands every idle worker to whoever has work queued, but a worker is
  only idle because the other clients' images are in the forward pass, which needs the same
  cores (measured on 2 cores: a client streaming 6300 x 6300 PNGs took half the throughput of 16
  others). So each tenant with a request in flight (`serving`) is entitled to workers / (such
  tenants) of the workers' time, measured as its jobs run; a tenant more than SLACK_S ahead of
  that waits, even with a worker free. A tenant alone may use every worker.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from spurguard.server.errors import InvalidInput, Unavailable

R = TypeVar("R")

# Seconds of a worker per unit of cost, for a job still running (once it ran, its measured time
# counts): decoding measured 6-85 ns a pixel, so this errs on the side of holding a heavy job's
# tenant back while the job runs.
UNIT_S = 20e-9
# How far ahead of its share a tenant may run: short bursts of ordinary images never wait, an
# image that costs a tenth of a second of decoding does.
SLACK_S = 0.05


class Tenant:
    """One request or stream as the decode pool sees it: its jobs share one fair share."""

    __slots__ = ("finish", "clock", "requests")

    def __init__(self) -> None:
        self.finish = 0.0  # the pool's virtual time (in cost) at which this tenant's queued work ends
        self.clock = 0.0  # time.monotonic() until which its use of the workers is paid for
        self.requests = 0  # its requests in flight (DecodePool.serving)


@dataclass(order=True)
class _Job:
    start: float  # virtual start tag: the order jobs run in
    seq: int  # ties: submission order
    tenant: Tenant = field(compare=False)
    cost: float = field(compare=False)
    future: Future[Any] = field(compare=False)
    fn: Callable[..., Any] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)
    share: float = field(default=0.0, compare=False)  # seconds of its tenant's clock per second it runs
    charge: float = field(default=0.0, compare=False)  # what was charged to the clock when it started


class DecodePool:
    """`workers` threads that run submitted jobs fairly across tenants (see the module)."""

    def __init__(self, workers: int, name: str = "spurguard-decode") -> None:
        if workers < 1:
            raise InvalidInput(f"decode workers must be >= 1, got {workers}")
        self._workers = workers
        self._queue: list[_Job] = []
        self._ready = threading.Condition()
        self._virtual = 0.0  # start tag of the job taken last; only grows
        self._seq = itertools.count()
        self._active = 0  # tenants with a request in flight
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    @contextmanager
    def serving(self, tenant: Tenant) -> Iterator[None]:
        """While one of `tenant`'s requests is in flight, decoding or waiting for the model: the
        tenants so counted split the workers' time."""
        with self._ready:
            tenant.requests += 1
            if tenant.requests == 1:
                self._active += 1
        try:
            yield
        finally:
            with self._ready:
                tenant.requests -= 1
                if tenant.requests == 0:
                    self._active -= 1
                    self._ready.notify_all()  # the others' shares grew

    def submit(self, tenant: Tenant, cost: float, fn: Callable[..., R], *args: Any) -> Future[R]:
        """Queue `fn(*args)`, `cost` (in pixels) of `tenant`'s share; its future has the result."""
        future: Future[R] = Future()
        with self._ready:
            if self._closed:
                raise Unavailable("decoding: the server is shutting down")
            start = max(self._virtual, tenant.finish)
            tenant.finish = start + cost
            heapq.heappush(self._queue, _Job(start, next(self._seq), tenant, cost, future, fn, args))
            self._ready.notify()
        return future

    async def run(self, tenant: Tenant, cost: float, fn: Callable[..., R], *args: Any) -> R:
        """`submit`, awaited; a cancelled caller's job is dropped if it has not started."""
        return await asyncio.wrap_future(self.submit(tenant, cost, fn, *args))

    def _take(self, now: float) -> _Job | float | None:
        """The next job, charged to its tenant's clock; else the seconds until a held-back one
        may run, or None when nothing is queued. Called with the lock held."""
        held: list[_Job] = []
        try:
            while self._queue:
                job = heapq.heappop(self._queue)
                if self._active > 1 and job.tenant.clock > now + SLACK_S:
                    held.append(job)
                    continue
                self._virtual = max(self._virtual, job.start)
                job.share = max(self._active, 1) / self._workers
                job.charge = job.cost * UNIT_S * job.share
                job.tenant.clock = max(job.tenant.clock, now) + job.charge
                return job
            return min(job.tenant.clock for job in held) - SLACK_S - now if held else None
        finally:
            for job in held:
                heapq.heappush(self._queue, job)

    def _next(self) -> _Job | None:
        """The next job to run, waiting for one; None once the pool is shut down."""
        with self._ready:
            while True:
                taken = self._take(time.monotonic())
                if isinstance(taken, _Job):
                    return taken
                if taken is None and self._closed:
                    return None
                self._ready.wait(taken)

    def _work(self) -> None:
        while (job := self._next()) is not None:
            started = time.monotonic()
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.fn(*job.args))
                except BaseException as error:  # noqa: BLE001 - the caller's to handle, as an executor's
                    job.future.set_exception(error)
            with self._ready:  # what it cost, measured, instead of the estimate
                job.tenant.clock += (time.monotonic() - started) * job.share - job.charge
                self._ready.notify()

    def shutdown(self) -> None:
        """Refuse new jobs and fail the queued ones (UNAVAILABLE); running ones finish, unwaited."""
        with self._ready:
            self._closed = True
            queued, self._queue = self._queue, []
            self._ready.notify_all()
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Unavailable("decoding: the server is shutting down"))
