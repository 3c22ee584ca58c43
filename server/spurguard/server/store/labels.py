"""Human labels of components: the record, its checks, and what a label database must do.

Labels are keyed by fit_id as well as (model, digest, class, component): a component index only
means something within one fit; a refit's commit carries them to the new fit's matching
components (store.carry), while the old labels stay queryable.

Each label records its author (the caller's token name, "" without tokens), and every write,
an unlabeled one too, is appended to the label history in the same transaction: the label row is
the last write, the history keeps the ones before it (another labeller's note, a cleared label).
History entries are ordered by an insertion sequence, taken while writers are serialised, so
their order is exactly the order in which the writes committed.

Two databases implement `LabelDB`: SQLite beside the fits (store/sqlite.py, the embedded
default) and PostgreSQL shared by replicas (store/postgres.py); each holds its own SQL. Checks
happen here, once, so both accept and refuse exactly the same.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from spurguard.server.errors import InvalidInput
from spurguard.vocab import LABELS, UNLABELED, LabelRecord

MAX_NOTE_CHARS = 10_000
COLUMNS = "model, digest, fit_id, class_index, component, label, note, updated, author"  # labels and history


@dataclass(frozen=True)
class Label:
    """One component's label, or one write in its history; `updated` is UTC ISO-8601 (None for a
    never-labeled component), `author` who wrote it ("" without tokens, or before authors)."""

    model: str
    digest: str
    fit_id: str
    class_index: int
    component: int
    label: str
    note: str
    updated: str | None
    author: str = ""

    def record(self, *, written: bool = False) -> LabelRecord:
        """This label as a result: an unlabeled component has no time, unless this is a
        `written` entry of the history, where clearing a label is a write with its time."""
        cleared = self.label == UNLABELED and not written
        updated = None if cleared or self.updated is None else datetime.fromisoformat(self.updated)
        return LabelRecord(self.model, self.fit_id, self.class_index, self.component, self.label,  # type: ignore[arg-type]
                           self.note, updated, self.author)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def check_label(label: object) -> str:
    if label not in LABELS:
        raise InvalidInput(f"invalid label {label!r}: use one of {', '.join(LABELS)}")
    return str(label)


def check_filter(class_index: int | None, component: int | None) -> tuple[int | None, int | None]:
    """The (class, component) filters as integers; a component alone is INVALID_ARGUMENT, since
    component indices are per class."""
    if component is not None and class_index is None:
        raise InvalidInput("a component filter needs class_index: component indices are per class")
    return (None if class_index is None else int(class_index)), (None if component is None else int(component))


class LabelDB(ABC):
    """The labels of one store; safe to use from any number of threads (and processes)."""

    def set(
        self,
        model: str,
        digest: str,
        fit_id: str,
        class_index: int,
        component: int,
        label: str,
        note: str,
        *,
        author: str = "",
    ) -> Label:
        """Upsert a label; `unlabeled` deletes the row, so unlabeled is simply the absence of one.
        Either way the write is appended to the history."""
        check_label(label)
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            raise InvalidInput(f"note must be a string of at most {MAX_NOTE_CHARS} characters")
        if not isinstance(author, str):
            raise InvalidInput("author must be a string")
        record = Label(model, digest, fit_id, int(class_index), int(component), label, note, utc_now(), author)
        if label == UNLABELED:
            record = Label(*key_of(record), UNLABELED, "", record.updated, author)
        self._write(record)
        return record

    def query(
        self,
        model: str,
        digest: str,
        fit_id: str,
        class_index: int | None = None,
        label: str | None = None,
        component: int | None = None,
    ) -> list[Label]:
        """Stored labels of one fit, ordered by (class, component); optional class / label /
        component (with its class) filters."""
        k, c = check_filter(class_index, component)
        return self._select(model, digest, fit_id, k, c, None if label is None else check_label(label))

    def history(
        self, model: str, digest: str, fit_id: str, class_index: int | None = None, component: int | None = None
    ) -> list[Label]:
        """Every write of one fit's labels (unlabeled ones included), oldest first; optional class
        and component (with its class) filters."""
        return self._history(model, digest, fit_id, *check_filter(class_index, component))

    @abstractmethod
    def _write(self, record: Label) -> None:
        """Store `record` (replacing that component's row), or delete the row if it is unlabeled,
        and append it to the history, in one transaction that holds back other label writes so
        history order is commit order; announced (see `announce`) with the write."""

    @abstractmethod
    def _select(
        self, model: str, digest: str, fit_id: str, class_index: int | None, component: int | None, label: str | None
    ) -> list[Label]:
        """The rows of one fit, ordered by (class, component), filtered by what is not None."""

    @abstractmethod
    def _history(self, model: str, digest: str, fit_id: str, class_index: int | None, component: int | None) -> list[Label]:
        """The history entries of one fit in insertion order, filtered by what is not None."""

    @abstractmethod
    def carry(self, model: str, digest: str, source_fit: str, target_fit: str, classes: Iterable[int]) -> None:
        """Copy the labels of `classes`, and their history, from one fit to another (classes whose
        components are identical)."""

    @abstractmethod
    def forget_fit(self, model: str, digest: str, fit_id: str) -> None:
        """Drop every label and history entry of a fit id (a new fit reusing an abandoned id must
        start unlabeled)."""

    @abstractmethod
    def announce(self, model: str, digest: str, fit_id: str) -> None:
        """Tell the other servers sharing this database that these weights' labels or current fit
        changed (a no-op where they poll instead)."""

    @abstractmethod
    def rows(self) -> Iterator[Label]:
        """Every stored label (what a migration to another database copies)."""

    @abstractmethod
    def history_rows(self) -> Iterator[Label]:
        """Every history entry, in insertion order (what a migration to another database copies)."""


def key_of(record: Label) -> tuple[str, str, str, int, int]:
    """A label row's primary key."""
    return record.model, record.digest, record.fit_id, record.class_index, record.component


def values_of(record: Label) -> tuple[object, ...]:
    """A label's values in COLUMNS order."""
    return (*key_of(record), record.label, record.note, record.updated, record.author)


def placeholders(mark: str) -> str:
    """`(mark, mark, …)`: one row of COLUMNS in a driver's placeholder style (`?`, `%s`)."""
    return "(" + ", ".join([mark] * len(COLUMNS.split(","))) + ")"


def fit_filter(
    mark: str, model: str, digest: str, fit_id: str, class_index: int | None, component: int | None,
    label: str | None = None,
) -> tuple[str, list[object]]:
    """The WHERE clause selecting one fit's rows, filtered by what is not None (in the labels and
    the history table alike), and its arguments."""
    sql = f"model={mark} AND digest={mark} AND fit_id={mark}"
    args: list[object] = [model, digest, fit_id]
    for column, value in (("class_index", class_index), ("component", component), ("label", label)):
        if value is not None:
            sql += f" AND {column}={mark}"
            args.append(value)
    return sql, args
