"""The embedded database: labels and job records in `labels.sqlite3` beside the fits (WAL), and
the owners of jobs as flocked files in `owners/`. Every SQL statement of SQLite is here.

Why a connection per operation: writes come from RPC and job threads (and other processes
sharing the store); SQLite serialises writers with its own locking and WAL lets readers go on
during a write, so nothing here needs a connection shared between threads. A statement is its
own transaction, except a label write and its history entry (and the schema's migration on
open), which share one that takes the write lock at its start (`write_transaction`), so none is
ever left open and history order is commit order.

Servers sharing a store this way (one disk) cannot push changes to each other: there is no
change feed, and they poll (`--store-poll-s`). A network volume gives SQLite no reliable locks;
replicas there use PostgreSQL (store/postgres.py).
"""
from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from spurguard.server.store.atomic import make_dirs, try_lock
from spurguard.server.store.changes import ChangeFeed
from spurguard.server.store.jobs import JobDB, JobRecord, Row, decode_job, encode_job, iso
from spurguard.server.store.labels import COLUMNS, Label, LabelDB, fit_filter, key_of, placeholders, values_of
from spurguard.server.store.layout import LABELS_DB, OWNERS, new_id
from spurguard.vocab import FINISHED_JOB_STATES, UNLABELED, Job

BUSY_TIMEOUT_S = 30.0

_LABELS_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    model       TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    fit_id      TEXT    NOT NULL,
    class_index INTEGER NOT NULL,
    component   INTEGER NOT NULL,
    label       TEXT    NOT NULL CHECK (label IN ('spurious', 'not_spurious', 'inconsistent')),
    note        TEXT    NOT NULL,
    updated     TEXT    NOT NULL,
    author      TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (model, digest, fit_id, class_index, component)
) WITHOUT ROWID
"""

# Every label write, oldest first by `seq` (a rowid: each new one is above every other).
_HISTORY_SCHEMA = """
CREATE TABLE label_history (
    seq         INTEGER PRIMARY KEY,
    model       TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    fit_id      TEXT    NOT NULL,
    class_index INTEGER NOT NULL,
    component   INTEGER NOT NULL,
    label       TEXT    NOT NULL CHECK (label IN ('spurious', 'not_spurious', 'inconsistent', 'unlabeled')),
    note        TEXT    NOT NULL,
    updated     TEXT    NOT NULL,
    author      TEXT    NOT NULL
)
"""
_HISTORY_INDEX = "CREATE INDEX label_history_fit ON label_history (model, digest, fit_id, class_index, component)"

_JOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id  TEXT PRIMARY KEY,
    model   TEXT NOT NULL,
    state   TEXT NOT NULL,
    owner   TEXT NOT NULL,
    created TEXT NOT NULL,
    record  TEXT NOT NULL
)
"""

_KEY = "model=? AND digest=? AND fit_id=? AND class_index=? AND component=?"
_ROW = placeholders("?")


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    # isolation_level=None: autocommit, each statement its own transaction.
    with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as db:
        yield db


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction that holds SQLite's write lock from its start (BEGIN IMMEDIATE): what it
    reads cannot change before it writes, and writers commit in the order they began."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def create_table(path: Path, schema: str) -> None:
    """Create a table (if missing) in the database at `path`, in WAL mode."""
    with connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(schema)


def _migrate_labels(db: sqlite3.Connection) -> None:
    """Bring a labels database of any earlier version up to date, once (inside the caller's write
    transaction, so servers opening one store together do not race): the `author` column ('' for
    labels stored before authors), and the history, seeded with the labels as they stand."""
    if "author" not in {row[1] for row in db.execute("PRAGMA table_info(labels)")}:
        db.execute("ALTER TABLE labels ADD COLUMN author TEXT NOT NULL DEFAULT ''")
    if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='label_history'").fetchone() is None:
        db.execute(_HISTORY_SCHEMA)
        db.execute(_HISTORY_INDEX)
        db.execute(f"INSERT INTO label_history ({COLUMNS}) SELECT {COLUMNS} FROM labels "
                   "ORDER BY updated, class_index, component")


class SqliteLabels(LabelDB):
    """The labels and label_history tables of `labels.sqlite3`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        create_table(path, _LABELS_SCHEMA)
        with connect(path) as db, write_transaction(db):
            _migrate_labels(db)

    def _write(self, record: Label) -> None:
        with connect(self.path) as db, write_transaction(db):
            if record.label == UNLABELED:
                db.execute(f"DELETE FROM labels WHERE {_KEY}", key_of(record))
            else:
                db.execute(
                    f"INSERT INTO labels ({COLUMNS}) VALUES {_ROW} "
                    "ON CONFLICT (model, digest, fit_id, class_index, component) DO UPDATE SET "
                    "label=excluded.label, note=excluded.note, updated=excluded.updated, author=excluded.author",
                    values_of(record),
                )
            db.execute(f"INSERT INTO label_history ({COLUMNS}) VALUES {_ROW}", values_of(record))

    def _select(
        self, model: str, digest: str, fit_id: str, class_index: int | None, component: int | None, label: str | None
    ) -> list[Label]:
        where, args = fit_filter("?", model, digest, fit_id, class_index, component, label)
        with connect(self.path) as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM labels WHERE {where} ORDER BY class_index, component", args)
            return [Label(*row) for row in rows.fetchall()]

    def _history(self, model: str, digest: str, fit_id: str, class_index: int | None, component: int | None) -> list[Label]:
        where, args = fit_filter("?", model, digest, fit_id, class_index, component)
        with connect(self.path) as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM label_history WHERE {where} ORDER BY seq", args)
            return [Label(*row) for row in rows.fetchall()]

    def carry(self, model: str, digest: str, source_fit: str, target_fit: str, classes: Iterable[int]) -> None:
        copied = "model, digest, ?, class_index, component, label, note, updated, author"
        source = "WHERE model=? AND digest=? AND fit_id=? AND class_index IN (SELECT value FROM json_each(?))"
        args = (target_fit, model, digest, source_fit, json.dumps([int(k) for k in classes]))
        with connect(self.path) as db, write_transaction(db):
            db.execute(f"INSERT OR REPLACE INTO labels ({COLUMNS}) SELECT {copied} FROM labels {source}", args)
            db.execute(f"INSERT INTO label_history ({COLUMNS}) SELECT {copied} FROM label_history {source} ORDER BY seq",
                       args)

    def forget_fit(self, model: str, digest: str, fit_id: str) -> None:
        with connect(self.path) as db, write_transaction(db):
            for table in ("labels", "label_history"):
                db.execute(f"DELETE FROM {table} WHERE model=? AND digest=? AND fit_id=?", (model, digest, fit_id))

    def announce(self, model: str, digest: str, fit_id: str) -> None:
        """Nothing to do: servers sharing a SQLite store poll it."""

    def rows(self) -> Iterator[Label]:
        with connect(self.path) as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM labels").fetchall()
        yield from (Label(*row) for row in rows)

    def history_rows(self) -> Iterator[Label]:
        with connect(self.path) as db:
            rows = db.execute(f"SELECT {COLUMNS} FROM label_history ORDER BY seq").fetchall()
        yield from (Label(*row) for row in rows)


class SqliteJobs(JobDB):
    """The jobs table of `labels.sqlite3`; owners hold an flock on `owners/<owner>.lock`, which the
    kernel drops when the process dies."""

    def __init__(self, path: Path, owners: Path) -> None:
        self.path = path
        self._owners = owners
        self._owner_fd: int | None = None
        create_table(path, _JOBS_SCHEMA)

    def claim_owner(self) -> str:
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
        if self._owner_fd is not None:
            (self._owners / f"{self.owner}.lock").unlink(missing_ok=True)
            os.close(self._owner_fd)
            self._owner_fd = None

    def _alive(self, owner: str) -> bool:
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

    def save(self, job: Job) -> None:
        with connect(self.path) as db:
            db.execute(
                "INSERT OR REPLACE INTO jobs (job_id, model, state, owner, created, record) VALUES (?, ?, ?, ?, ?, ?)",
                (job.job_id, job.model, job.state, self.owner, iso(job.created), encode_job(job)),
            )

    def _rows_of(self, job_id: str) -> list[Row]:
        with connect(self.path) as db:
            return db.execute("SELECT owner, record FROM jobs WHERE job_id=?", (job_id,)).fetchall()

    def _recent(self, model: str | None, limit: int) -> list[Row]:
        sql, args = "SELECT owner, record FROM jobs", []
        if model is not None:
            sql, args = sql + " WHERE model=?", [model]
        with connect(self.path) as db:
            return db.execute(sql + " ORDER BY created DESC, job_id DESC LIMIT ?", [*args, limit]).fetchall()

    def _unfinished(self) -> list[Row]:
        with connect(self.path) as db:
            return db.execute(
                "SELECT owner, record FROM jobs WHERE state NOT IN (SELECT value FROM json_each(?))",
                (json.dumps(sorted(FINISHED_JOB_STATES)),),
            ).fetchall()

    def _replace_unfinished(self, job: Job, owner: str, state: str) -> None:
        with connect(self.path) as db:
            db.execute(
                "UPDATE jobs SET state=?, record=? WHERE job_id=? AND owner=? AND state=?",
                (job.state, encode_job(job), job.job_id, owner, state),
            )

    def rows(self) -> Iterator[JobRecord]:
        with connect(self.path) as db:
            rows = db.execute("SELECT owner, record FROM jobs").fetchall()
        yield from (JobRecord(decode_job(record), owner) for owner, record in rows)


class SqliteDatabase:
    """Labels and jobs of a store in its own `labels.sqlite3`."""

    changes: ChangeFeed | None = None  # nothing pushed: servers sharing the store poll it

    def __init__(self, root: Path) -> None:
        self.labels = SqliteLabels(root / LABELS_DB)
        self.jobs = SqliteJobs(root / LABELS_DB, root / OWNERS)

    def close(self) -> None:
        """Nothing held open (a connection per operation)."""
