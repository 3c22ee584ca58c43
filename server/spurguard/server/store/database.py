"""Which database holds a store's labels and job records, chosen by `serve --labels URL`.

`sqlite` (the default): `labels.sqlite3` inside the store, embedded, for one server or replicas
on one local disk. `postgresql://user@host:port/db` (a libpq URL): a PostgreSQL database that
replicas share, whatever volume the fits are on, and that pushes every change to them.
Fits stay files on the store volume in both cases.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from spurguard.server.errors import InvalidInput
from spurguard.server.store.changes import ChangeFeed
from spurguard.server.store.jobs import JobDB
from spurguard.server.store.labels import LabelDB
from spurguard.server.store.sqlite import SqliteDatabase

SQLITE = "sqlite"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Database(Protocol):
    """What a backend gives the Store: its labels, its job records, the changes other servers
    push (None: none are pushed, servers poll), and `close` for what it holds open."""

    labels: LabelDB
    jobs: JobDB
    changes: ChangeFeed | None

    def close(self) -> None: ...


def check_url(url: str) -> str:
    """`url` if it names a database this store can use; INVALID_ARGUMENT otherwise."""
    if url != SQLITE and not url.startswith(POSTGRES_SCHEMES):
        given = f", got {url!r}" if "@" not in url else ""  # never echo what may hold a password
        raise InvalidInput(f"--labels must be {SQLITE} or a postgresql://user@host:port/dbname URL{given}")
    return url


def open_database(url: str, root: Path) -> Database:
    """The database `url` names, its schema created or brought up to date (PostgreSQL: and the
    store's own labels.sqlite3 imported the first time; see store/postgres.py)."""
    if check_url(url) == SQLITE:
        return SqliteDatabase(root)
    from spurguard.server.store.postgres import PostgresDatabase  # psycopg only where it is used

    return PostgresDatabase(url, root)
