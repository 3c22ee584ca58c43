"""Dynamic batching: many small concurrent requests share one forward pass.

Why: a backbone's cost per image falls steeply with the batch size, while production traffic
arrives one image at a time. Submissions queue up; a batch closes when it is full
(`max_batch_size`) or when its oldest item has waited `max_delay_s`, and runs on the model's own
worker threads so the event loop keeps accepting requests. Items that arrive while every worker
is busy form the next batch at once (their wait already counts), so under load batches fill
without any added delay. A local forward pass uses every core, so it runs one batch at a time;
a remote one (Triton) mostly waits on the wire, so `max_in_flight` batches overlap there and the
next request is on its way while the last one computes. Each item gets its own result or its own exception: one bad item never
fails its neighbours.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from spurguard.server.errors import InvalidInput, Unavailable

T = TypeVar("T")
R = TypeVar("R")

# Runs one batch in the worker thread: one result or exception per item, in item order.
ProcessBatch = Callable[[list[T]], Sequence["R | BaseException"]]


@dataclass(frozen=True)
class BatchStats:
    """What one batch cost, for the metrics."""

    size: int
    queue_s: tuple[float, ...]  # per item: submission to the start of its batch
    compute_s: float  # the process call in the worker thread


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float  # time.monotonic()


class Batcher(Generic[T, R]):
    """Collects concurrent `submit` calls into batches for `process`, run on `max_in_flight`
    worker threads (at most that many batches at once).

    Create and use it from one event loop; the collector task starts with the first submission.
    """

    def __init__(
        self,
        process: ProcessBatch[T, R],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_in_flight: int = 1,
        name: str = "batcher",
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise InvalidInput(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise InvalidInput(f"max_delay must be >= 0, got {max_delay_s}")
        if max_in_flight < 1:
            raise InvalidInput(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self._process = process
        self._on_batch = on_batch
        self._pending: deque[_Pending[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix=f"spurguard-{name}")
        self._free_workers = asyncio.Semaphore(max_in_flight)
        self._running: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._idle_since = 0.0  # when a worker last finished a batch (time.monotonic())
        self._closed = False

    async def submit(self, item: T) -> R:
        """The item's result, or its exception raised here."""
        if self._closed:
            raise Unavailable(f"{self.name}: the server is shutting down")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, future, time.monotonic()))
        self._arrived.set()
        if self._task is None:
            self._task = asyncio.create_task(self._collect(), name=f"spurguard-{self.name}")
        return await future

    async def submit_many(self, items: Sequence[T]) -> list[R | BaseException]:
        """Results of several items in their order; failed ones are their exceptions."""
        return list(await asyncio.gather(*(self.submit(item) for item in items), return_exceptions=True))

    async def _collect(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            await self._free_workers.acquire()
            oldest = self._pending[0].enqueued
            # Waiting for company only pays while a worker idles; what queued while every worker
            # was busy has waited already and goes next, as many as fit.
            deadline = oldest + self.max_delay_s if oldest >= self._idle_since else 0.0
            while len(self._pending) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            count = min(self.max_batch_size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(count)]
            live = [p for p in batch if not p.future.done()]  # callers that went away are dropped
            if not live:
                self._free_workers.release()
                continue
            running = asyncio.create_task(self._run(live), name=f"spurguard-{self.name}-batch")
            self._running.add(running)
            running.add_done_callback(self._finished)

    def _finished(self, running: asyncio.Task[None]) -> None:
        self._running.discard(running)
        self._idle_since = time.monotonic()
        self._free_workers.release()

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._worker, self._process, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for a batch of {len(batch)}")
        except asyncio.CancelledError:  # closed mid-batch: nobody may wait forever
            self._fail(batch)
            raise
        except Exception as error:  # noqa: BLE001 - a failed batch fails each of its items, not the loop
            results = [error] * len(batch)
        compute_s = time.monotonic() - started
        for pending, result in zip(batch, results):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), tuple(started - p.enqueued for p in batch), compute_s))

    async def close(self) -> None:
        """Stop collecting, fail what is still queued, and release the worker thread."""
        self._closed = True
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._fail(list(self._pending))
        self._pending.clear()
        await asyncio.to_thread(self._worker.shutdown, wait=True)

    def _fail(self, batch: list[_Pending[T, R]]) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"{self.name}: the server is shutting down"))
