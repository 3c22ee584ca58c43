"""Jobs (Fit, Transfer): long work on worker threads that outlives the call that started it, and the server.

Why a registry: a fit over ImageNet runs for hours, longer than any client connection. The job
belongs to the server; calls only watch it. A Fit stream whose client disconnects stops
watching, never the job; WatchJob re-attaches; CancelJob stops it at the next batch, keeping
the classes already finished on disk. The job id is the fit id, so submitting a cancelled (or
killed) job's id again resumes its fit. A transfer job is the same kind of job with another
request and summary (`Job.kind`); its finished classes are kept under the transfer's id, which
the source state determines, so any later transfer from the same state resumes it.

Why in the store too: every state change (and progress, at most every PROGRESS_SAVE_S) is saved
as the job's record (store.jobs), so GetJob, ListJobs and WatchJob still answer for jobs of an
earlier server process and of other servers sharing the store. A job whose server died (kill -9,
crash, power loss) is not resumed behind the user's back: its record becomes FAILED with code
ABORTED, "interrupted", and the same request with the same job id resumes it. (An automatic
resume would have to outlive model changes and restarts with other flags; an explicit one does.)

Threads and the event loop meet in one place: a job's state changes under its lock on the
worker thread, which then wakes the watchers on the loop (call_soon_threadsafe). A watcher
always sends the latest state, so a slow watcher skips intermediate progress instead of
buffering it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from spurguard.server.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    SpurguardError,
    Unavailable,
    error_status,
)
from spurguard.server.store import JobDB, JobRecord
from spurguard.vocab import (
    FINISHED_JOB_STATES,
    ErrorStatus,
    FitProgress,
    FitRequest,
    FitSummary,
    FitUpdate,
    Job,
    JobStateName,
    TransferRequest,
    TransferSummary,
)

log = logging.getLogger("spurguard.server")

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
KEEP_FINISHED = 100  # finished jobs kept in memory; ListJobs lists at most this many recorded ones besides
DEFAULT_MAX_QUEUED = 16  # fit jobs waiting for a worker; more are RESOURCE_EXHAUSTED (--max-queued-jobs)
PROGRESS_SAVE_S = 2.0  # a running job's progress reaches its record at most this often
RECORD_POLL_S = 1.0  # how often a watcher of a job this server does not run re-reads its record

JobRequest = FitRequest | TransferRequest
JobSummary = FitSummary | TransferSummary
# The work of a job, run on a worker thread: (job id, report progress, cancel) -> summary.
# Raises Cancelled (a cancelled job) or another error (a failed job, with that error's status).
JobWork = Callable[[str, Callable[[FitProgress], None], threading.Event], JobSummary]


def job_info(job_id: str, state: JobStateName, request: JobRequest, progress: FitProgress | None,
             summary: JobSummary | None, error: ErrorStatus | None, created: datetime | None,
             updated: datetime | None) -> Job:
    """The Job a client sees, with the request and summary in the fields of its kind."""
    if isinstance(request, TransferRequest):
        return Job(job_id, request.model, state, None, progress, None, error, created, updated, "transfer", request,
                   summary)  # type: ignore[arg-type]
    return Job(job_id, request.model, state, request, progress, summary, error, created, updated)  # type: ignore[arg-type]


def job_request(job: Job) -> JobRequest | None:
    return job.transfer if job.kind == "transfer" else job.request


def job_summary(job: Job) -> JobSummary | None:
    return job.transfer_summary if job.kind == "transfer" else job.summary


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


def final_update(state: JobStateName, summary: JobSummary | None, error: ErrorStatus | None) -> JobSummary | None:
    """A finished job's last stream item, its summary (a failed or cancelled one raises its
    error instead); None while it is unfinished."""
    if state not in FINISHED_JOB_STATES:
        return None
    if state == "succeeded" and summary is not None:
        return summary
    raise JobFailure(error or ErrorStatus("UNKNOWN", f"the job ended {state} without a reason"))


class LocalJob:
    """One job this server runs; mutated only by the registry, read by anyone."""

    def __init__(self, request: JobRequest, job_id: str, work: JobWork, loop: asyncio.AbstractEventLoop,
                 save: Callable[[Job], None]) -> None:
        self.job_id = job_id
        self.model = request.model
        self.request = request
        self.work = work
        self.cancel_event = threading.Event()
        self._loop = loop
        self._save = save
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._saved_at = 0.0
        self._created = datetime.now(timezone.utc)
        self._started = time.monotonic()  # reset when it starts running: elapsed_s excludes the queue
        self._updated = self._created
        self._state: JobStateName = "queued"
        self._progress = FitProgress(self.job_id, "queued", 0, 0, 0, 0, 0.0)
        self._summary: JobSummary | None = None
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

    def snapshot(self) -> tuple[int, JobStateName, FitProgress, JobSummary | None, ErrorStatus | None]:
        """(version, state, progress, summary, error), consistent with each other."""
        with self._lock:
            return self._version, self._state, self._progress, self._summary, self._error

    def info(self) -> Job:
        """What GetJob / ListJobs / CancelJob report."""
        with self._lock:
            return job_info(self.job_id, self._state, self.request, self._progress, self._summary, self._error,
                            self._created, self._updated)

    def update(
        self,
        *,
        state: JobStateName | None = None,
        progress: FitProgress | None = None,
        summary: JobSummary | None = None,
        error: ErrorStatus | None = None,
    ) -> None:
        """Change the state (from any thread), record it and wake the watchers; a finished job
        stays as it is."""
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
        self.record(force=state is not None)
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody is watching any more
            pass

    def record(self, *, force: bool = True) -> None:
        """Save the job's state to the store: a state change always, progress at most every
        PROGRESS_SAVE_S. A worker thread saves before it goes on; the event loop hands the
        write to a thread, since it must not wait for the disk."""
        if not force and time.monotonic() - self._saved_at < PROGRESS_SAVE_S:
            return
        self._saved_at = time.monotonic()
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # no loop in this thread: a worker
            on_loop = False
        if on_loop:
            self._loop.run_in_executor(None, self.save)
        else:
            self.save()

    def save(self) -> None:
        """Write the job's current state to its record (blocking)."""
        # The snapshot is taken under the save lock, so writes land in the order of the states.
        with self._save_lock:
            try:
                self._save(self.info())
            except (sqlite3.Error, OSError, Unavailable) as error:  # the job goes on; only its record lags
                log.warning("job %s: could not record its state in the store: %s", self.job_id, error)

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
                last = final_update(state, summary, error)
                if last is not None:
                    yield last
                    return
                await waiter
            finally:
                self._waiters.discard(waiter)


class RecordedJob:
    """A job this server does not run, as its store record: one of an earlier server process
    (finished, or interrupted by its death) or one that another server sharing the store runs."""

    def __init__(self, record: JobRecord, db: JobDB) -> None:
        self._record = record
        self._db = db
        self.job_id = record.job.job_id
        self.model = record.job.model

    @property
    def state(self) -> JobStateName:
        return self._record.job.state

    @property
    def finished(self) -> bool:
        return self._record.finished

    @property
    def created(self) -> datetime:
        return self._record.job.created or datetime.min.replace(tzinfo=timezone.utc)

    def info(self) -> Job:
        return self._record.job

    async def updates(self) -> AsyncIterator[FitUpdate]:
        """Its recorded progress, then (re-reading the record while another server runs it) the
        summary, or its error raised."""
        sent: FitProgress | None = None
        while True:
            job = self._record.job
            if job.progress is not None and job.progress != sent:
                sent = job.progress
                yield job.progress
            last = final_update(job.state, job_summary(job), job.error)
            if last is not None:
                yield last
                return
            await asyncio.sleep(RECORD_POLL_S)
            self._record = await asyncio.to_thread(self._db.get, self.job_id) or self._record


AnyJob = LocalJob | RecordedJob


class JobRegistry:
    """Jobs (fit and transfer) by id, run `workers` at a time with at most `max_queued` waiting; every job is
    recorded in `db`, and the newest KEEP_FINISHED finished ones of this server stay in memory."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, db: JobDB, *, workers: int = 1, max_queued: int = DEFAULT_MAX_QUEUED
    ) -> None:
        if workers < 1:
            raise InvalidInput(f"fit workers must be >= 1, got {workers}")
        if max_queued < 0:
            raise InvalidInput(f"max queued jobs must be >= 0, got {max_queued}")
        self._loop = loop
        self._db = db
        self._workers = workers
        self._max_queued = max_queued
        self._jobs: dict[str, LocalJob] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="spurguard-fit")
        self._closed = False
        db.claim_owner()  # from now on, other servers see this one's jobs as running

    def _recorded(self, job_id: str) -> RecordedJob | None:
        record = self._db.get(job_id)
        return None if record is None else RecordedJob(record, self._db)

    async def submit(self, request: JobRequest, work: JobWork) -> AnyJob:
        """Start a job, or return the live or succeeded job of that id (re-attach).

        A failed or cancelled job's id (one interrupted by a server's death too) starts a new run
        under the same id, which resumes its work. RESOURCE_EXHAUSTED when `max_queued` jobs wait.
        """
        job_id = check_job_id(request.job_id or "")
        existing: AnyJob | None = self._jobs.get(job_id)
        if existing is None:
            recorded = await asyncio.to_thread(self._recorded, job_id)
            existing = self._jobs.get(job_id) or recorded  # a submit of the same id may have won meanwhile
        if existing is not None and existing.state not in ("failed", "cancelled"):
            info = existing.info()
            if job_request(info) != request:
                raise FailedPrecondition(
                    f"job {job_id} exists ({info.kind} job of model {info.model}) "
                    "with other settings; follow it with WatchJob or choose another job id"
                )
            return existing
        if self._closed:
            raise Unavailable("the server is shutting down; it takes no new jobs")
        unfinished = sum(not job.finished for job in self._jobs.values())
        if unfinished >= self._workers + self._max_queued:
            raise ResourceExhausted(
                f"{unfinished - self._workers} jobs already wait for a worker (limit --max-queued-jobs "
                f"{self._max_queued}, with --fit-workers {self._workers}); wait for one to finish, cancel one, "
                "or raise --max-queued-jobs"
            )
        job = LocalJob(request, job_id, work, self._loop, self._db.save)
        self._jobs.pop(job_id, None)
        self._jobs[job_id] = job
        self._forget_old()
        self._pool.submit(self._run, job)
        await asyncio.to_thread(job.save)  # recorded before the caller hears that it was accepted
        return job

    def _run(self, job: LocalJob) -> None:
        if job.cancel_event.is_set():
            return  # cancelled while queued: already marked
        job.update(state="running")
        try:
            summary = job.work(job.job_id, lambda p: job.update(progress=p), job.cancel_event)
        except Exception as error:  # noqa: BLE001 - reported on the job, not lost in a worker thread
            status = error_status(error, f"{job.info().kind} job {job.job_id}")
            job.update(state="cancelled" if status.code == "CANCELLED" else "failed", error=status)
        else:
            job.update(state="succeeded", summary=summary)

    def _forget_old(self) -> None:
        finished = sorted((j for j in self._jobs.values() if j.finished), key=lambda j: j.created)
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.job_id]

    async def get(self, job_id: str) -> AnyJob:
        job = self._jobs.get(job_id) or await asyncio.to_thread(self._recorded, job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}: neither this server nor its store has a record of it")
        return job

    async def list(self, model: str | None = None) -> list[AnyJob]:
        """This server's jobs and the newest KEEP_FINISHED recorded ones, newest first."""
        records = await asyncio.to_thread(self._db.list, model, KEEP_FINISHED)
        jobs: dict[str, AnyJob] = {r.job.job_id: RecordedJob(r, self._db) for r in records}
        jobs.update({j.job_id: j for j in self._jobs.values() if model is None or j.model == model})
        return sorted(jobs.values(), key=lambda j: j.created, reverse=True)

    async def cancel(self, job_id: str) -> AnyJob:
        """Ask the job to stop; a queued job is cancelled at once, a running one at its next batch."""
        job = await self.get(job_id)
        if job.finished:
            return job
        if isinstance(job, RecordedJob):
            raise FailedPrecondition(
                f"job {job_id} runs on another server sharing this store; cancel it there"
            )
        self._cancel(job)
        return job

    @staticmethod
    def _cancel(job: LocalJob) -> None:
        job.cancel_event.set()
        if job.state == "queued":
            job.update(state="cancelled", error=ErrorStatus("CANCELLED", f"job {job.job_id} cancelled before it started"))

    async def shutdown(self) -> None:
        """Cancel every unfinished job, wait until their threads have closed their fits cleanly
        (and recorded their state), then stop owning jobs."""
        self._closed = True
        for job in list(self._jobs.values()):
            if not job.finished:
                self._cancel(job)
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        await asyncio.to_thread(self._db.release_owner)
