"""The job registry's records: one row per job (fit or transfer) in the store's SQLite database, table `jobs`.

Why in the store: a fit job outlives its call and can outlive the server process (a crash, a
restart, a deploy), and a client asking after its job must get an answer, not NOT_FOUND. A
record is the job's last reported state (the vocabulary's Job as JSON, never pickle), replaced
whole by one statement, so a kill leaves either the old or the new row.

Each record names its owner, the server process that runs it. A running server holds an flock on
`owners/<owner>.lock`; the kernel drops it when the process dies. So any server sharing the store
can tell a job another live replica runs from one whose server died: the latter is settled as
failed with ABORTED ("interrupted") when it is next read, and at start-up. Only the methods of
`JobDB` are the interface; a PostgreSQL store (issue 12) implements the same ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spurguard.server.store.atomic import make_dirs, try_lock
from spurguard.server.store.layout import new_id
from spurguard.server.store.sqlite import connect, create_table
from spurguard.vocab import (
    FINISHED_JOB_STATES,
    ErrorStatus,
    FitClass,
    FitProgress,
    FitRequest,
    FitSummary,
    Job,
    LabelCarried,
    LabelNotCarried,
    TransferClass,
    TransferDirection,
    TransferRequest,
    TransferSummary,
)

INTERRUPTED = "ABORTED"  # the error code of a job whose server died under it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id  TEXT PRIMARY KEY,
    model   TEXT NOT NULL,
    state   TEXT NOT NULL,
    owner   TEXT NOT NULL,
    created TEXT NOT NULL,
    record  TEXT NOT NULL
)
"""


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def encode_job(job: Job) -> str:
    """A Job as JSON text (times ISO 8601)."""
    return json.dumps(dataclasses.asdict(job), allow_nan=False, default=datetime.isoformat)


def decode_job(text: str) -> Job:
    """The Job that `encode_job` wrote."""
    r: dict[str, Any] = json.loads(text)
    request, progress, summary, error = r["request"], r["progress"], r["summary"], r["error"]
    transfer, moved = r.get("transfer"), r.get("transfer_summary")  # absent from records of fit-only servers
    return Job(
        job_id=r["job_id"],
        model=r["model"],
        state=r["state"],
        request=None if request is None else FitRequest(**{**request, "classes": tuple(request["classes"])}),
        progress=None if progress is None else FitProgress(**progress),
        summary=None if summary is None else FitSummary(**{
            **summary,
            "classes": tuple(FitClass(**c) for c in summary["classes"]),
            "labels_carried": tuple(LabelCarried(**c) for c in summary.get("labels_carried", ())),
            "labels_not_carried": tuple(LabelNotCarried(**c) for c in summary.get("labels_not_carried", ())),
        }),
        error=None if error is None else ErrorStatus(**error),
        created=_time(r["created"]),
        updated=_time(r["updated"]),
        kind=r.get("kind", "fit"),
        transfer=None if transfer is None else TransferRequest(**{**transfer, "classes": tuple(transfer["classes"])}),
        transfer_summary=None if moved is None else TransferSummary(**{**moved, "classes": tuple(
            TransferClass(c["class_index"], c["images"], tuple(TransferDirection(**d) for d in c["directions"]))
            for c in moved["classes"]
        )}),
    )


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """A stored job and the server that runs (or ran) it."""

    job: Job
    owner: str

    @property
    def finished(self) -> bool:
        return self.job.state in FINISHED_JOB_STATES


class JobDB:
    """The job records of one store; safe to use from any number of threads and processes."""

    def __init__(self, path: Path, owners: Path) -> None:
        self.path = path
        self._owners = owners
        self._owner_fd: int | None = None
        self.owner = ""  # set by claim_owner: this process's jobs are saved under it
        create_table(path, _SCHEMA)

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return connect(self.path)

    # ---- owners ----

    def claim_owner(self) -> str:
        """Become an owner of jobs: a new id whose lock this process holds until `release_owner`
        (or its death). Returns the id."""
        make_dirs(self._owners)
        owner = new_id()
        path = self._owners / f"{owner}.lock"
        while True:
            fd = try_lock(path)
            # A sweep may have taken the new file for a dead owner's and unlinked it: retry.
            if fd is not None and path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            if fd is not None:
                os.close(fd)
        self._owner_fd, self.owner = fd, owner
        return owner

    def release_owner(self) -> None:
        """Stop owning jobs (a clean shutdown, after every job of this process has finished)."""
        if self._owner_fd is not None:
            (self._owners / f"{self.owner}.lock").unlink(missing_ok=True)
            os.close(self._owner_fd)
            self._owner_fd = None

    def _alive(self, owner: str) -> bool:
        """Whether the server `owner` still runs (holds its lock)."""
        if owner == self.owner and self._owner_fd is not None:
            return True
        path = self._owners / f"{owner}.lock"
        if not path.exists():
            return False
        fd = try_lock(path)
        if fd is None:
            return True
        try:  # dead: its lock file goes, unlinked while locked so no new owner can be using it
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        return False

    # ---- records ----

    def save(self, job: Job) -> None:
        """Insert or replace the record of a job this process owns."""
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO jobs (job_id, model, state, owner, created, record) VALUES (?, ?, ?, ?, ?, ?)",
                (job.job_id, job.model, job.state, self.owner, _iso(job.created), encode_job(job)),
            )

    def get(self, job_id: str) -> JobRecord | None:
        """A job's record (settled: see `settle`), or None if there never was such a job."""
        with self._connect() as db:
            rows = db.execute("SELECT owner, record FROM jobs WHERE job_id=?", (job_id,)).fetchall()
        return next(iter(self._settled(rows)), None)

    def list(self, model: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest `limit` records (of one model, if given), newest first, settled."""
        sql, args = "SELECT owner, record FROM jobs", []
        if model is not None:
            sql, args = sql + " WHERE model=?", [model]
        with self._connect() as db:
            rows = db.execute(sql + " ORDER BY created DESC, job_id DESC LIMIT ?", [*args, limit]).fetchall()
        return self._settled(rows)

    def settle(self) -> list[str]:
        """Mark every unfinished job whose server died as interrupted; the ids it marked."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT owner, record FROM jobs WHERE state NOT IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(FINISHED_JOB_STATES)),),
            ).fetchall()
        return [r.job.job_id for r in self._settled(rows) if r.finished]  # unfinished before: interrupted now

    def _settled(self, rows: list[tuple[str, str]]) -> list[JobRecord]:
        """Records as stored, except that an unfinished job of a dead server is marked interrupted
        (and stored so)."""
        records = [JobRecord(decode_job(record), owner) for owner, record in rows]
        alive: dict[str, bool] = {}
        settled = []
        for record in records:
            if not record.finished and not alive.setdefault(record.owner, self._alive(record.owner)):
                record = JobRecord(self._interrupt(record), record.owner)
            settled.append(record)
        return settled

    def _interrupt(self, record: JobRecord) -> Job:
        job = record.job
        error = ErrorStatus(
            INTERRUPTED,
            f"job {job.job_id} was interrupted: the server running it stopped (killed or crashed) while it was "
            f"{job.state}; {'transfer' if job.kind == 'transfer' else 'fit'} again with job id {job.job_id} to resume "
            "it (finished classes are kept)",
        )
        job = dataclasses.replace(job, state="failed", error=error, updated=datetime.now(timezone.utc))
        with self._connect() as db:  # only if still the dead owner's unfinished record
            db.execute(
                "UPDATE jobs SET state=?, record=? WHERE job_id=? AND owner=? AND state=?",
                (job.state, encode_job(job), job.job_id, record.owner, record.job.state),
            )
        return job


def _iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat()
