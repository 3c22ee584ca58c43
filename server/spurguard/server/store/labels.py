"""Human labels of components, in one SQLite table (WAL) beside the fits.

Why SQLite: label writes come from concurrent RPC threads (and possibly several processes);
SQLite serialises writers with its own locking, WAL lets readers proceed during a write, and a
single row upsert is atomic and durable. A connection is opened per operation, so no connection
is ever shared between threads.

Labels are keyed by fit_id as well as (model, digest, class, component): a component index only
means something within one fit; a refit's commit carries them to the new fit's matching
components (store.carry), while the old labels stay queryable.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from spurguard.server.errors import InvalidInput
from spurguard.server.store.sqlite import connect, create_table
from spurguard.vocab import LABELS, UNLABELED

MAX_NOTE_CHARS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    model       TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    fit_id      TEXT    NOT NULL,
    class_index INTEGER NOT NULL,
    component   INTEGER NOT NULL,
    label       TEXT    NOT NULL CHECK (label IN ('spurious', 'not_spurious', 'inconsistent')),
    note        TEXT    NOT NULL,
    updated     TEXT    NOT NULL,
    PRIMARY KEY (model, digest, fit_id, class_index, component)
) WITHOUT ROWID
"""
_COLUMNS = "model, digest, fit_id, class_index, component, label, note, updated"


@dataclass(frozen=True)
class Label:
    """One component's label; `updated` is UTC ISO-8601 (None for a never-labeled component)."""

    model: str
    digest: str
    fit_id: str
    class_index: int
    component: int
    label: str
    note: str
    updated: str | None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_label(label: object) -> str:
    if label not in LABELS:
        raise InvalidInput(f"invalid label {label!r}: use one of {', '.join(LABELS)}")
    return str(label)


class LabelDB:
    """The labels table of one store; safe to use from any number of threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        create_table(path, _SCHEMA)

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return connect(self.path)

    def set(
        self, model: str, digest: str, fit_id: str, class_index: int, component: int, label: str, note: str
    ) -> Label:
        """Upsert a label; `unlabeled` deletes the row, so unlabeled is simply the absence of one."""
        check_label(label)
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            raise InvalidInput(f"note must be a string of at most {MAX_NOTE_CHARS} characters")
        record = Label(model, digest, fit_id, int(class_index), int(component), label, note, utc_now())
        key = (model, digest, fit_id, record.class_index, record.component)
        with self._connect() as db:
            if label == UNLABELED:
                db.execute(
                    "DELETE FROM labels WHERE model=? AND digest=? AND fit_id=? AND class_index=? AND component=?",
                    key,
                )
                return Label(*key, UNLABELED, "", record.updated)
            db.execute(
                f"INSERT INTO labels ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (model, digest, fit_id, class_index, component) "
                "DO UPDATE SET label=excluded.label, note=excluded.note, updated=excluded.updated",
                (*key, label, note, record.updated),
            )
        return record

    def query(
        self,
        model: str,
        digest: str,
        fit_id: str,
        class_index: int | None = None,
        label: str | None = None,
    ) -> list[Label]:
        """Stored labels of one fit, ordered by (class, component); optional class / label filters."""
        sql = f"SELECT {_COLUMNS} FROM labels WHERE model=? AND digest=? AND fit_id=?"
        args: list[object] = [model, digest, fit_id]
        if class_index is not None:
            sql += " AND class_index=?"
            args.append(int(class_index))
        if label is not None:
            sql += " AND label=?"
            args.append(check_label(label))
        with self._connect() as db:
            rows = db.execute(sql + " ORDER BY class_index, component", args).fetchall()
        return [Label(*row) for row in rows]

    def carry(self, model: str, digest: str, source_fit: str, target_fit: str, classes: Iterable[int]) -> None:
        """Copy the labels of `classes` from one fit to another (classes whose components are identical)."""
        with self._connect() as db:
            db.execute(
                f"INSERT OR REPLACE INTO labels ({_COLUMNS}) "
                "SELECT model, digest, ?, class_index, component, label, note, updated FROM labels "
                "WHERE model=? AND digest=? AND fit_id=? AND class_index IN (SELECT value FROM json_each(?))",
                (target_fit, model, digest, source_fit, json.dumps([int(k) for k in classes])),
            )

    def forget_fit(self, model: str, digest: str, fit_id: str) -> None:
        """Drop every label of a fit id (a new fit reusing an abandoned id must start unlabeled)."""
        with self._connect() as db:
            db.execute("DELETE FROM labels WHERE model=? AND digest=? AND fit_id=?", (model, digest, fit_id))
