"""The store's one SQLite database (labels, job records): WAL, a connection per operation.

Why a connection per operation: writes come from RPC and job threads (and other processes
sharing the store); SQLite serialises writers with its own locking and WAL lets readers go on
during a write, so nothing here needs a connection shared between threads.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

BUSY_TIMEOUT_S = 30.0


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    # isolation_level=None: each statement is its own atomic transaction (every write here is a
    # single statement), so no transaction is ever left open.
    with closing(sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as db:
        yield db


def create_table(path: Path, schema: str) -> None:
    """Create a table (if missing) in the database at `path`, in WAL mode."""
    with connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(schema)
