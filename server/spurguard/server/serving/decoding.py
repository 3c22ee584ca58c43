"""The decode workers every request shares, scheduled so that no request starves the others.

Why: decoding is the one step whose cost a client controls (a small file can claim millions of
pixels). On one FIFO thread pool, the 24 heavy images of one request held every other client's
one-image Score behind them for seconds. Here each request (a Score or ModelInfer call) or stream
(ScoreStream) is a `Tenant`, and the workers take jobs in start-time fair queuing order (Goyal et
al., SIGCOMM 1996) weighted by each job's cost (pixels decoded plus bytes read, known from the
header before any work): while several tenants have work queued, each gets an equal share of
the decoding, however much it sends; a newcomer's job waits for nothing but the jobs already
running. The pool stays work-conserving: a tenant alone may use every worker.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from spurguard.server.errors import InvalidInput, Unavailable

R = TypeVar("R")


class Tenant:
    """One request or stream as the decode pool sees it: its jobs share one fair share."""

    __slots__ = ("finish",)

    def __init__(self) -> None:
        self.finish = 0.0  # the pool's virtual time at which this tenant's queued work ends


@dataclass(order=True)
class _Job:
    start: float  # virtual start tag: the order jobs run in
    seq: int  # ties: submission order
    future: Future[Any] = field(compare=False)
    fn: Callable[..., Any] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)


class DecodePool:
    """`workers` threads that run submitted jobs in fair order across tenants."""

    def __init__(self, workers: int, name: str = "spurguard-decode") -> None:
        if workers < 1:
            raise InvalidInput(f"decode workers must be >= 1, got {workers}")
        self._queue: list[_Job] = []
        self._ready = threading.Condition()
        self._virtual = 0.0  # start tag of the job taken last; only grows
        self._seq = itertools.count()
        self._closed = False
        for i in range(workers):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def submit(self, tenant: Tenant, cost: float, fn: Callable[..., R], *args: Any) -> Future[R]:
        """Queue `fn(*args)`, `cost` (in pixels) of `tenant`'s share; its future has the result."""
        future: Future[R] = Future()
        with self._ready:
            if self._closed:
                raise Unavailable("decoding: the server is shutting down")
            start = max(self._virtual, tenant.finish)
            tenant.finish = start + cost
            heapq.heappush(self._queue, _Job(start, next(self._seq), future, fn, args))
            self._ready.notify()
        return future

    async def run(self, tenant: Tenant, cost: float, fn: Callable[..., R], *args: Any) -> R:
        """`submit`, awaited; a cancelled caller's job is dropped if it has not started."""
        return await asyncio.wrap_future(self.submit(tenant, cost, fn, *args))

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                job = heapq.heappop(self._queue)
                self._virtual = job.start
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                result = job.fn(*job.args)
            except BaseException as error:  # noqa: BLE001 - the caller's to handle, as an executor's
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def shutdown(self) -> None:
        """Refuse new jobs and fail the queued ones (UNAVAILABLE); running ones finish, unwaited."""
        with self._ready:
            self._closed = True
            queued, self._queue = self._queue, []
            self._ready.notify_all()
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Unavailable("decoding: the server is shutting down"))
