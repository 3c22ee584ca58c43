"""The job registry's records: one row per job (fit or transfer) in the store's database, table `jobs`.

Why in the store: a fit job outlives its call and can outlive the server process (a crash, a
restart, a deploy), and a client asking after its job must get an answer, not NOT_FOUND. A
record is the job's last reported state (the vocabulary's Job as JSON, never pickle), replaced
whole by one statement, so a kill leaves either the old or the new row.

Each record names its owner, the server process that runs it, and every backend can tell whether
an owner still runs, by something that dies with its process: SQLite's an flock on
`owners/<owner>.lock` (store/sqlite.py), PostgreSQL's a session advisory lock held by the
server's connection (store/postgres.py). So any server sharing the store can tell a job another
live replica runs from one whose server died: the latter is settled as failed with ABORTED
("interrupted") when it is next read, and at start-up. `JobDB` holds that logic once; a backend
supplies its rows and its owners.
"""
from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

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


# A row as a backend returns it: (owner, the record's JSON text).
Row = tuple[str, str]


class JobDB(ABC):
    """The job records of one store; safe to use from any number of threads and processes."""

    owner = ""  # set by claim_owner: this process's jobs are saved under it

    # ---- owners ----

    @abstractmethod
    def claim_owner(self) -> str:
        """Become an owner of jobs: a new id that stays alive for the others until `release_owner`
        (or this process's death). Returns the id."""

    @abstractmethod
    def release_owner(self) -> None:
        """Stop owning jobs (a clean shutdown, after every job of this process has finished)."""

    @abstractmethod
    def _alive(self, owner: str) -> bool:
        """Whether the server `owner` still runs (a dead one's traces may be cleared here)."""

    # ---- rows ----

    @abstractmethod
    def save(self, job: Job) -> None:
        """Insert or replace the record of a job this process owns."""

    @abstractmethod
    def _rows_of(self, job_id: str) -> list[Row]:
        """The row of one job (none or one)."""

    @abstractmethod
    def _recent(self, model: str | None, limit: int) -> list[Row]:
        """The newest `limit` rows (of one model, if given), newest first (created, then job id)."""

    @abstractmethod
    def _unfinished(self) -> list[Row]:
        """The rows whose state is not one of FINISHED_JOB_STATES."""

    @abstractmethod
    def _replace_unfinished(self, job: Job, owner: str, state: str) -> None:
        """Store `job` as the record of its id, only if that still is `owner`'s, in `state`."""

    @abstractmethod
    def rows(self) -> Iterator[JobRecord]:
        """Every record as stored (not settled): what a migration to another database copies."""

    # ---- records ----

    def get(self, job_id: str) -> JobRecord | None:
        """A job's record (settled: see `settle`), or None if there never was such a job."""
        return next(iter(self._settled(self._rows_of(job_id))), None)

    def list(self, model: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest `limit` records (of one model, if given), newest first, settled."""
        return self._settled(self._recent(model, limit))

    def settle(self) -> list[str]:
        """Mark every unfinished job whose server died as interrupted; the ids it marked."""
        return [r.job.job_id for r in self._settled(self._unfinished()) if r.finished]  # unfinished before: interrupted now

    def _settled(self, rows: list[Row]) -> list[JobRecord]:
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
        self._replace_unfinished(job, record.owner, record.job.state)
        return job


def iso(moment: datetime | None) -> str:
    """A job's time as its `created` column holds it ("" for none)."""
    return "" if moment is None else moment.isoformat()
