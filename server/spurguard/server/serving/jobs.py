"""Fit jobs: long work on worker threads that outlives the call that started it.

Why a registry: a fit over ImageNet runs for hours, longer than any client connection. The job
belongs to the server; calls only watch it. A Fit stream whose client disconnects stops
watching, never the job; WatchJob re-attaches; CancelJob stops it at the next batch, keeping
the classes already finished on disk. The job id is the fit id, so submitting a cancelled (or
killed) job's id again resumes its fit.

Threads and the event loop meet in one place: a job's state changes under its lock on the
worker thread, which then wakes the watchers on the loop (call_soon_threadsafe). A watcher
always sends the latest state, so a slow watcher skips intermediate progress instead of
buffering it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from spurguard.server.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    SpurguardError,
    Unavailable,
    error_status,
)
from spurguard.vocab import (
    FINISHED_JOB_STATES,
    ErrorStatus,
    FitProgress,
    FitRequest,
    FitSummary,
    FitUpdate,
    Job,
    JobStateName,
)

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
KEEP_FINISHED = 100  # finished jobs remembered for GetJob / ListJobs / WatchJob

# The work of a job, run on a worker thread: (job id, report progress, cancel) -> summary.
# Raises Cancelled (a cancelled job) or another error (a failed job, with that error's status).
JobWork = Callable[[str, Callable[[FitProgress], None], threading.Event], FitSummary]


def check_job_id(job_id: str) -> str:
    if not JOB_ID_RE.match(job_id):
        raise InvalidInput(
            f"invalid job id {job_id!r}: use 1-128 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return job_id


class JobFailure(SpurguardError):
    """A finished job's error, raised to each of its watchers with the job's own status code."""

    def __init__(self, error: ErrorStatus) -> None:
        super().__init__(error.message)
        self.code = error.code


class FitJob:
    """One fit job's state; mutated only by the registry, read by anyone."""

    def __init__(self, request: FitRequest, work: JobWork, loop: asyncio.AbstractEventLoop) -> None:
        assert request.job_id is not None  # the registry names every job before it exists
        self.job_id: str = request.job_id
        self.model = request.model
        self.request = request
        self.work = work
        self.cancel_event = threading.Event()
        self._loop = loop
        self._lock = threading.Lock()
        self._created = datetime.now(timezone.utc)
        self._started = time.monotonic()  # reset when it starts running: elapsed_s excludes the queue
        self._updated = self._created
        self._state: JobStateName = "queued"
        self._progress = FitProgress(self.job_id, "queued", 0, 0, 0, 0, 0.0)
        self._summary: FitSummary | None = None
        self._error: ErrorStatus | None = None
        self._version = 0
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def state(self) -> JobStateName:
        return self._state

    @property
    def finished(self) -> bool:
        return self._state in FINISHED_JOB_STATES

    @property
    def created(self) -> datetime:
        return self._created

    def snapshot(self) -> tuple[int, JobStateName, FitProgress, FitSummary | None, ErrorStatus | None]:
        """(version, state, progress, summary, error), consistent with each other."""
        with self._lock:
            return self._version, self._state, self._progress, self._summary, self._error

    def info(self) -> Job:
        """What GetJob / ListJobs / CancelJob report."""
        with self._lock:
            return Job(
                self.job_id, self.model, self._state, self.request, self._progress, self._summary, self._error,
                self._created, self._updated,
            )

    def update(
        self,
        *,
        state: JobStateName | None = None,
        progress: FitProgress | None = None,
        summary: FitSummary | None = None,
        error: ErrorStatus | None = None,
    ) -> None:
        """Change the state (from any thread) and wake the watchers; a finished job stays as it is."""
        with self._lock:
            if self._state in FINISHED_JOB_STATES:
                return
            if state == "running":
                self._started = time.monotonic()
            if state is not None:
                self._state = state
            if progress is not None:
                self._progress = dataclasses.replace(progress, elapsed_s=time.monotonic() - self._started)
            self._summary = summary or self._summary
            self._error = error or self._error
            self._updated = datetime.now(timezone.utc)
            self._version += 1
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody is watching any more
            pass

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def updates(self) -> AsyncIterator[FitUpdate]:
        """The latest progress, then each change, then the summary; a failed or cancelled job raises."""
        sent = -1
        while True:
            waiter = self._loop.create_future()
            self._waiters.add(waiter)  # before reading, so no change between the two is missed
            try:
                version, state, progress, summary, error = self.snapshot()
                if version != sent:
                    sent = version
                    yield progress
                if state == "succeeded":
                    assert summary is not None
                    yield summary
                    return
                if state in FINISHED_JOB_STATES:
                    assert error is not None
                    raise JobFailure(error)
                await waiter
            finally:
                self._waiters.discard(waiter)


class JobRegistry:
    """Fit jobs by id, run `workers` at a time; the newest KEEP_FINISHED finished ones are kept."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, workers: int = 1) -> None:
        if workers < 1:
            raise InvalidInput(f"fit workers must be >= 1, got {workers}")
        self._loop = loop
        self._jobs: dict[str, FitJob] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spurguard-fit")
        self._closed = False

    def submit(self, request: FitRequest, work: JobWork) -> FitJob:
        """Start a job, or return the live or succeeded job of that id (re-attach).

        A failed or cancelled job's id starts a new run under the same id, which resumes its fit.
        """
        check_job_id(request.job_id or "")
        existing = self._jobs.get(request.job_id or "")
        if existing is not None and existing.state not in ("failed", "cancelled"):
            if existing.request != request:
                raise FailedPrecondition(
                    f"job {request.job_id} exists (model {existing.model}, dataset {existing.request.dataset!r}) "
                    "with other settings; follow it with WatchJob or choose another job id"
                )
            return existing
        if self._closed:
            raise Unavailable("the server is shutting down; it takes no new jobs")
        job = FitJob(request, work, self._loop)
        self._jobs.pop(job.job_id, None)
        self._jobs[job.job_id] = job
        self._forget_old()
        self._pool.submit(self._run, job)
        return job

    def _run(self, job: FitJob) -> None:
        if job.cancel_event.is_set():
            return  # cancelled while queued: already marked
        job.update(state="running")
        try:
            summary = job.work(job.job_id, lambda p: job.update(progress=p), job.cancel_event)
        except Exception as error:  # noqa: BLE001 - reported on the job, not lost in a worker thread
            status = error_status(error, f"fit job {job.job_id}")
            job.update(state="cancelled" if status.code == "CANCELLED" else "failed", error=status)
        else:
            job.update(state="succeeded", summary=summary)

    def _forget_old(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.created)
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.job_id]

    def get(self, job_id: str) -> FitJob:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(
                f"no job {job_id!r} on this server (finished jobs are kept until {KEEP_FINISHED} newer ones finish)"
            ) from None

    def list(self, model: str | None = None) -> list[FitJob]:
        """Newest first."""
        jobs = [j for j in self._jobs.values() if model is None or j.model == model]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    def cancel(self, job_id: str) -> FitJob:
        """Ask the job to stop; a queued job is cancelled at once, a running one at its next batch."""
        job = self.get(job_id)
        if job.finished:
            return job
        job.cancel_event.set()
        if job.state == "queued":
            job.update(state="cancelled", error=ErrorStatus("CANCELLED", f"job {job_id} cancelled before it started"))
        return job

    async def shutdown(self) -> None:
        """Cancel every unfinished job and wait until their threads have closed their fits cleanly."""
        self._closed = True
        for job in list(self._jobs.values()):
            if not job.finished:
                self.cancel(job.job_id)
        await asyncio.to_thread(self._pool.shutdown, wait=True)
