"""Labels and job records in PostgreSQL, shared by replicas, with changes pushed through
LISTEN/NOTIFY. Every SQL statement of PostgreSQL is here.

Why PostgreSQL: replicas on a cluster share the fits through a network volume, where SQLite's
file locking is not to be trusted; a database server serialises their writes instead, and tells
every server at once what another changed (`serve --labels postgresql://…`).

- **Schema**: created and migrated at start, in one transaction under an advisory lock (so
  replicas starting together do not race); `schema_version` holds the version reached. A
  database of a newer version than this server knows is refused.
- **Import**: the first start on a database copies the store's `labels.sqlite3`, if it has one
  (labels with their notes, timestamps and authors, their history, job records), in that same
  transaction, and records so in `imports`: later starts never import again, so a label cleared
  since stays cleared.
- **History order**: a label write (a carry, a forgotten fit) first locks `label_history`
  against other writers (SHARE ROW EXCLUSIVE: reads go on), so the identity `seq` of its entries
  is taken in commit order and history order is exactly the order the writes took effect.
- **Changes**: a label write NOTIFYs channel `spurguard` (payload: model, digest, fit_id) in
  its own transaction, so the notice goes out exactly when the write commits; a committed fit
  NOTIFYs after its `current.json` is switched. Each server LISTENs on a connection of its own
  (`_Session`, a thread) and publishes what arrives on its ChangeFeed. When that connection is
  lost it reconnects (backing off up to RECONNECT_MAX_S) and then publishes None: changes may
  have been missed, every model checks the store.
- **Owners of jobs**: a server claiming ownership takes a session-level advisory lock (class
  LOCK_CLASS, its key from `owner_keys`) on that same connection and then records
  (owner, lock_key) in `owners`. An owner is alive while its lock is held, which `pg_locks`
  shows every session; the lock ends with the connection, so a killed server's jobs read as
  interrupted as soon as PostgreSQL sees its connection gone (at once for a dead process; TCP
  keepalives bound it for a lost host). A session that lost its connection re-takes its lock on
  reconnecting; a job settled as interrupted in between is rewritten by its next save.
- **Connections**: queries take an idle connection (at most IDLE_CONNECTIONS are kept) or open
  one, one transaction each, with a statement timeout. A connection the server dropped (it
  restarted) is replaced and the work retried once, all of it idempotent. While the database
  cannot be reached every call that needs it is UNAVAILABLE, never INTERNAL; scoring goes on
  with the Guards in memory.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from spurguard.server.errors import FailedPrecondition, InvalidInput, Unavailable, first_line
from spurguard.server.store.changes import Change, ChangeFeed
from spurguard.server.store.jobs import JobDB, JobRecord, Row, decode_job, encode_job, iso
from spurguard.server.store.labels import COLUMNS, Label, LabelDB, fit_filter, key_of, placeholders, values_of
from spurguard.server.store.layout import LABELS_DB, OWNERS, new_id
from spurguard.server.store.sqlite import SqliteJobs, SqliteLabels
from spurguard.vocab import FINISHED_JOB_STATES, UNLABELED, Job

log = logging.getLogger("spurguard.server")

T = TypeVar("T")

CHANNEL = "spurguard"
LOCK_CLASS = 0x53475244  # "SGRD": the first key of every advisory lock spurguard takes
MIGRATION_LOCK = 0  # second key of the schema migration's lock; owners' keys start at 1
CONNECT_TIMEOUT_S = 5
STATEMENT_TIMEOUT_MS = 15_000
IDLE_CONNECTIONS = 4
LISTEN_TICK_S = 0.25  # how often the session thread looks up from LISTEN (stop, owner lock)
RECONNECT_MAX_S = 5.0
IMPORT_SOURCE = LABELS_DB

# Connection parameters a URL may set and otherwise gets: a bounded connect, and TCP keepalives
# so that a lost host's session (and its owner lock) ends within about a minute.
_DEFAULTS = {
    "connect_timeout": str(CONNECT_TIMEOUT_S),
    "application_name": "spurguard",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}

# Version N is MIGRATIONS[N - 1]; append, never edit: a database at version N has run them.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE labels (
            model       TEXT    NOT NULL,
            digest      TEXT    NOT NULL,
            fit_id      TEXT    NOT NULL,
            class_index INTEGER NOT NULL,
            component   INTEGER NOT NULL,
            label       TEXT    NOT NULL CHECK (label IN ('spurious', 'not_spurious', 'inconsistent')),
            note        TEXT    NOT NULL,
            updated     TEXT    NOT NULL,
            PRIMARY KEY (model, digest, fit_id, class_index, component)
        )""",
        """CREATE TABLE jobs (
            job_id  TEXT PRIMARY KEY,
            model   TEXT NOT NULL,
            state   TEXT NOT NULL,
            owner   TEXT NOT NULL,
            created TEXT NOT NULL,
            record  TEXT NOT NULL
        )""",
        "CREATE INDEX jobs_newest ON jobs (created DESC, job_id DESC)",
        "CREATE SEQUENCE owner_keys AS INTEGER START 1",
        "CREATE TABLE owners (owner TEXT PRIMARY KEY, lock_key INTEGER NOT NULL UNIQUE, "
        "started TIMESTAMPTZ NOT NULL DEFAULT now())",
        "CREATE TABLE imports (source TEXT PRIMARY KEY, store TEXT NOT NULL, labels INTEGER NOT NULL, "
        "jobs INTEGER NOT NULL, imported TIMESTAMPTZ NOT NULL DEFAULT now())",
    ),
    (  # 2: who set each label, and every write (the history), seeded with the labels as they stand
        "ALTER TABLE labels ADD COLUMN IF NOT EXISTS author TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE label_history (
            seq         BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            model       TEXT    NOT NULL,
            digest      TEXT    NOT NULL,
            fit_id      TEXT    NOT NULL,
            class_index INTEGER NOT NULL,
            component   INTEGER NOT NULL,
            label       TEXT    NOT NULL CHECK (label IN ('spurious', 'not_spurious', 'inconsistent', 'unlabeled')),
            note        TEXT    NOT NULL,
            updated     TEXT    NOT NULL,
            author      TEXT    NOT NULL
        )""",
        "CREATE INDEX label_history_fit ON label_history (model, digest, fit_id, class_index, component)",
        "INSERT INTO label_history (model, digest, fit_id, class_index, component, label, note, updated, author) "
        "SELECT model, digest, fit_id, class_index, component, label, note, updated, author FROM labels "
        "ORDER BY updated, class_index, component",
    ),
)

_KEY = "model=%s AND digest=%s AND fit_id=%s AND class_index=%s AND component=%s"
_ROW = placeholders("%s")
_ON_KEY = (
    "ON CONFLICT (model, digest, fit_id, class_index, component) "
    "DO UPDATE SET label=excluded.label, note=excluded.note, updated=excluded.updated, author=excluded.author"
)
_UPSERT_LABEL = f"INSERT INTO labels ({COLUMNS}) VALUES {_ROW} {_ON_KEY}"
_APPEND_HISTORY = f"INSERT INTO label_history ({COLUMNS}) VALUES {_ROW}"
_LOCK_HISTORY = "LOCK TABLE label_history IN SHARE ROW EXCLUSIVE MODE"  # writers one at a time, readers go on
_UPSERT_JOB = (
    "INSERT INTO jobs (job_id, model, state, owner, created, record) VALUES (%s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (job_id) DO UPDATE SET model=excluded.model, state=excluded.state, owner=excluded.owner, "
    "created=excluded.created, record=excluded.record"
)
_NOTIFY = "SELECT pg_notify(%s, %s)"


def _payload(model: str, digest: str, fit_id: str) -> str:
    return json.dumps({"model": model, "digest": digest, "fit_id": fit_id})


def _change(payload: str) -> Change | None:
    """The Change a notice carries; None (check everything) for one this version cannot read."""
    try:
        fields = json.loads(payload)
        return Change(str(fields["model"]), str(fields["digest"]), str(fields["fit_id"]))
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable notice on channel %s: %.200r", CHANNEL, payload)
        return None


class Connections:
    """Connections to one database: opened on demand, a few idle ones kept for reuse."""

    def __init__(self, url: str) -> None:
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError:  # its message may quote the URL, password and all
            raise InvalidInput("--labels: libpq cannot parse this postgresql:// URL") from None
        self._params = {**_DEFAULTS, **params}
        user, host = params.get("user", ""), params.get("host", "localhost")
        self.where = f"postgresql://{user + '@' if user else ''}{host}:{params.get('port', 5432)}/{params.get('dbname', '')}"
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    def unavailable(self, error: psycopg.Error) -> Unavailable:
        """The error a caller sees while the database cannot be used (no password in it)."""
        return Unavailable(f"the label database {self.where} is unavailable: {first_line(str(error))}")

    def connect(self) -> psycopg.Connection[Any]:
        """A new connection (autocommit: transactions are explicit), or UNAVAILABLE."""
        try:
            connection = psycopg.connect(**self._params, autocommit=True)
        except psycopg.OperationalError as error:
            raise self.unavailable(error) from None
        try:
            connection.execute("SELECT set_config('statement_timeout', %s, false)", (str(STATEMENT_TIMEOUT_MS),))
        except psycopg.OperationalError as error:
            connection.close()
            raise self.unavailable(error) from None
        return connection

    def _take(self) -> tuple[psycopg.Connection[Any], bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.connect(), False

    def _give_back(self, connection: psycopg.Connection[Any]) -> None:
        with self._lock:
            if not connection.closed and not self._closed and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(connection)
                return
        connection.close()

    def run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`work(connection)` in one transaction, committed when it returns; UNAVAILABLE when the
        database cannot be reached or times out. `work` must be idempotent: when a reused
        connection turns out dropped by the server, it runs again on a new one."""
        while True:
            connection, reused = self._take()
            try:
                with connection.transaction():
                    return work(connection)
            except psycopg.OperationalError as error:
                if reused and connection.broken:
                    continue  # an idle connection the server dropped (a restart): try a fresh one
                raise self.unavailable(error) from None
            finally:
                self._give_back(connection)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class _Session(threading.Thread):
    """This server's own connection to the database: LISTENs on CHANNEL (publishing what it hears
    on `feed`), and holds the advisory lock of its owner key, if it has one. Reconnects when lost."""

    def __init__(self, connections: Connections, feed: ChangeFeed) -> None:
        super().__init__(name="spurguard-pg-listen", daemon=True)
        self._connections = connections
        self._feed = feed
        self._stopping = threading.Event()
        self._state = threading.Condition()
        self._wanted: int | None = None  # the owner key to hold
        self._held: int | None = None
        self.listening = threading.Event()  # set while LISTEN is in effect

    def hold(self, key: int | None, timeout: float = CONNECT_TIMEOUT_S + 2 * LISTEN_TICK_S) -> None:
        """Have the session hold the lock of owner `key` (None: none); returns once it does."""
        with self._state:
            self._wanted = key
            if key is None:
                return  # released at the next tick, or with the connection
            if not self._state.wait_for(lambda: self._held == key, timeout):
                raise Unavailable(f"the label database {self._connections.where} did not grant this server's owner lock")

    def stop(self) -> None:
        self._stopping.set()
        self.join()

    def run(self) -> None:
        delay, lost = 0.1, False
        while not self._stopping.is_set():
            try:
                connection = self._connections.connect()
            except Unavailable as error:
                if not lost:
                    log.warning("%s; retrying", error)
                lost = True
                self._stopping.wait(delay)
                delay = min(2 * delay, RECONNECT_MAX_S)
                continue
            try:
                with connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self._lock_wanted(connection)  # the owner is alive again before anyone is told
                    self.listening.set()
                    if lost:
                        log.warning("the label database %s is back; checking every model", self._connections.where)
                        self._feed.publish(None)  # what changed while away went unheard
                    lost, delay = False, 0.1
                    self._listen(connection)
            except psycopg.Error as error:
                log.warning("lost the connection to the label database %s: %s", self._connections.where,
                            first_line(str(error)))
                lost = True
            finally:
                self.listening.clear()
                with self._state:
                    self._held = None

    def _listen(self, connection: psycopg.Connection[Any]) -> None:
        while not self._stopping.is_set():
            self._lock_wanted(connection)
            for notice in connection.notifies(timeout=LISTEN_TICK_S):
                self._feed.publish(_change(notice.payload))

    def _lock_wanted(self, connection: psycopg.Connection[Any]) -> None:
        with self._state:
            wanted, held = self._wanted, self._held
        if wanted == held:
            return
        if held is not None:
            connection.execute("SELECT pg_advisory_unlock(%s::integer, %s::integer)", (LOCK_CLASS, held))
        got = wanted is not None and connection.execute(
            "SELECT pg_try_advisory_lock(%s::integer, %s::integer)", (LOCK_CLASS, wanted)).fetchone()[0]
        with self._state:  # not got: a lost session of ours still holds it; next tick again
            self._held = wanted if got else None
            self._state.notify_all()


class PostgresLabels(LabelDB):
    """The labels and label_history tables; every write NOTIFYs."""

    def __init__(self, connections: Connections) -> None:
        self._connections = connections

    def _write(self, record: Label) -> None:
        def write(db: psycopg.Connection[Any]) -> None:
            db.execute(_LOCK_HISTORY)
            if record.label == UNLABELED:
                db.execute(f"DELETE FROM labels WHERE {_KEY}", key_of(record))
            else:
                db.execute(_UPSERT_LABEL, values_of(record))
            db.execute(_APPEND_HISTORY, values_of(record))
            db.execute(_NOTIFY, (CHANNEL, _payload(record.model, record.digest, record.fit_id)))

        self._connections.run(write)

    def _rows(self, table: str, order: str, where: str, args: list[object]) -> list[Label]:
        sql = f"SELECT {COLUMNS} FROM {table} WHERE {where} ORDER BY {order}"
        return [Label(*row) for row in self._connections.run(lambda db: db.execute(sql, args).fetchall())]

    def _select(
        self, model: str, digest: str, fit_id: str, class_index: int | None, component: int | None, label: str | None
    ) -> list[Label]:
        return self._rows("labels", "class_index, component",
                          *fit_filter("%s", model, digest, fit_id, class_index, component, label))

    def _history(self, model: str, digest: str, fit_id: str, class_index: int | None, component: int | None) -> list[Label]:
        return self._rows("label_history", "seq", *fit_filter("%s", model, digest, fit_id, class_index, component))

    def carry(self, model: str, digest: str, source_fit: str, target_fit: str, classes: Iterable[int]) -> None:
        copied = "model, digest, %s, class_index, component, label, note, updated, author"
        source = "WHERE model=%s AND digest=%s AND fit_id=%s AND class_index = ANY(%s::integer[])"
        args = (target_fit, model, digest, source_fit, [int(k) for k in classes])

        def copy(db: psycopg.Connection[Any]) -> None:
            db.execute(_LOCK_HISTORY)
            db.execute(f"INSERT INTO labels ({COLUMNS}) SELECT {copied} FROM labels {source} {_ON_KEY}", args)
            db.execute(f"INSERT INTO label_history ({COLUMNS}) SELECT {copied} FROM label_history {source} "
                       "ORDER BY seq", args)
            db.execute(_NOTIFY, (CHANNEL, _payload(model, digest, target_fit)))

        self._connections.run(copy)

    def forget_fit(self, model: str, digest: str, fit_id: str) -> None:
        def forget(db: psycopg.Connection[Any]) -> None:
            db.execute(_LOCK_HISTORY)  # first, as every writer: none waits on a row lock while holding it
            for table in ("labels", "label_history"):
                db.execute(f"DELETE FROM {table} WHERE model=%s AND digest=%s AND fit_id=%s", (model, digest, fit_id))
            db.execute(_NOTIFY, (CHANNEL, _payload(model, digest, fit_id)))

        self._connections.run(forget)

    def announce(self, model: str, digest: str, fit_id: str) -> None:
        """NOTIFY, best effort: a server that misses it still finds the change by polling."""
        try:
            self._connections.run(lambda db: db.execute(_NOTIFY, (CHANNEL, _payload(model, digest, fit_id))))
        except Unavailable as error:
            log.warning("could not tell the other servers about fit %s of %s: %s", fit_id, model, error)

    def rows(self) -> Iterator[Label]:
        yield from self._rows("labels", "class_index, component", "TRUE", [])

    def history_rows(self) -> Iterator[Label]:
        yield from self._rows("label_history", "seq", "TRUE", [])


class PostgresJobs(JobDB):
    """The jobs table; owners are alive while their session holds their advisory lock."""

    def __init__(self, connections: Connections, session: _Session) -> None:
        self._connections = connections
        self._session = session

    def claim_owner(self) -> str:
        owner = new_id()
        key = self._connections.run(lambda db: db.execute("SELECT nextval('owner_keys')").fetchone()[0])
        self._session.hold(key)  # locked before it is recorded: a recorded owner without its lock is dead
        self._connections.run(lambda db: db.execute(
            "INSERT INTO owners (owner, lock_key) VALUES (%s, %s)", (owner, key)))
        self.owner = owner
        return owner

    def release_owner(self) -> None:
        """Best effort: while the database is away its row stays, and the lock ends with the session."""
        if self.owner:
            owner, self.owner = self.owner, ""
            self._session.hold(None)
            try:
                self._connections.run(lambda db: db.execute("DELETE FROM owners WHERE owner=%s", (owner,)))
            except Unavailable as error:
                log.warning("could not remove owner %s: %s", owner, error)

    def _alive(self, owner: str) -> bool:
        if owner and owner == self.owner:
            return True

        def check(db: psycopg.Connection[Any]) -> bool:
            alive = db.execute(
                "SELECT EXISTS (SELECT 1 FROM owners o JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted "
                "AND l.classid::bigint = %s AND l.objid::bigint = o.lock_key AND l.objsubid = 2 "
                "WHERE o.owner = %s)",
                (LOCK_CLASS, owner),
            ).fetchone()[0]
            if not alive:  # dead: its row goes (a live owner is locked before it is recorded)
                db.execute("DELETE FROM owners WHERE owner=%s", (owner,))
            return bool(alive)

        return self._connections.run(check)

    def save(self, job: Job) -> None:
        self._connections.run(lambda db: db.execute(
            _UPSERT_JOB, (job.job_id, job.model, job.state, self.owner, iso(job.created), encode_job(job))))

    def _rows_of(self, job_id: str) -> list[Row]:
        return self._connections.run(
            lambda db: db.execute("SELECT owner, record FROM jobs WHERE job_id=%s", (job_id,)).fetchall())

    def _recent(self, model: str | None, limit: int) -> list[Row]:
        sql, args = "SELECT owner, record FROM jobs", []
        if model is not None:
            sql, args = sql + " WHERE model=%s", [model]
        query = sql + " ORDER BY created DESC, job_id DESC LIMIT %s"
        return self._connections.run(lambda db: db.execute(query, [*args, limit]).fetchall())

    def _unfinished(self) -> list[Row]:
        return self._connections.run(lambda db: db.execute(
            "SELECT owner, record FROM jobs WHERE state <> ALL(%s::text[])", (sorted(FINISHED_JOB_STATES),)).fetchall())

    def _replace_unfinished(self, job: Job, owner: str, state: str) -> None:
        self._connections.run(lambda db: db.execute(
            "UPDATE jobs SET state=%s, record=%s WHERE job_id=%s AND owner=%s AND state=%s",
            (job.state, encode_job(job), job.job_id, owner, state)))

    def rows(self) -> Iterator[JobRecord]:
        rows = self._connections.run(lambda db: db.execute("SELECT owner, record FROM jobs").fetchall())
        yield from (JobRecord(decode_job(record), owner) for owner, record in rows)


def _migrate(db: psycopg.Connection[Any]) -> int:
    """Bring the schema to the newest version (inside the caller's transaction); the version."""
    db.execute("SELECT pg_advisory_xact_lock(%s::integer, %s::integer)", (LOCK_CLASS, MIGRATION_LOCK))
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    version = db.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise FailedPrecondition(
            f"the label database has schema version {version}, newer than this server's {len(MIGRATIONS)}: "
            "upgrade spurguard")
    for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in statements:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
        log.info("label database schema: version %d", number)
    return len(MIGRATIONS)


def _import_sqlite(db: psycopg.Connection[Any], root: Path) -> None:
    """Copy the store's labels.sqlite3 (labels, their history, job records, as they are) the first
    time a server starts on this database; inside the migration's transaction, so at most once."""
    if db.execute("SELECT 1 FROM imports WHERE source=%s", (IMPORT_SOURCE,)).fetchone() is not None:
        return
    source = root / LABELS_DB
    embedded = SqliteLabels(source) if source.is_file() else None
    labels = [] if embedded is None else list(embedded.rows())
    history = [] if embedded is None else list(embedded.history_rows())
    jobs = list(SqliteJobs(source, root / OWNERS).rows()) if source.is_file() else []
    with db.cursor() as cursor:
        cursor.executemany(f"INSERT INTO labels ({COLUMNS}) VALUES {_ROW} ON CONFLICT DO NOTHING",
                           [values_of(x) for x in labels])
        cursor.executemany(_APPEND_HISTORY, [values_of(x) for x in history])  # in order: seq follows it
        cursor.executemany(
            "INSERT INTO jobs (job_id, model, state, owner, created, record) VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            [(r.job.job_id, r.job.model, r.job.state, r.owner, iso(r.job.created), encode_job(r.job)) for r in jobs],
        )
    db.execute("INSERT INTO imports (source, store, labels, jobs) VALUES (%s, %s, %s, %s)",
               (IMPORT_SOURCE, str(root), len(labels), len(jobs)))
    if labels or jobs:
        log.info("imported %d labels and %d job records from %s into the label database", len(labels), len(jobs),
                 source)


class PostgresDatabase:
    """A store's labels and job records in the PostgreSQL database at `url`, the changes other
    servers make pushed to `changes`."""

    def __init__(self, url: str, root: Path) -> None:
        self._connections = Connections(url)
        try:
            self._connections.run(lambda db: (_migrate(db), _import_sqlite(db, root)))
        except BaseException:
            self._connections.close()
            raise
        self.changes = ChangeFeed()
        self._session = _Session(self._connections, self.changes)
        self.labels = PostgresLabels(self._connections)
        self.jobs = PostgresJobs(self._connections, self._session)
        self._session.start()
        log.info("labels and jobs in %s", self._connections.where)

    @property
    def listening(self) -> threading.Event:
        """Set while this server hears the others' changes (tests wait for it)."""
        return self._session.listening

    def close(self) -> None:
        """Stop listening (which ends the owner lock too) and close the idle connections."""
        self._session.stop()
        self._connections.close()
