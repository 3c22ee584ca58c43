"""Human labels of components: the record, its checks, and what a label database must do.

Labels are keyed by fit_id as well as (model, digest, class, component): a component index only
means something within one fit; a refit's commit carries them to the new fit's matching
components (store.carry), while the old labels stay queryable.

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
from spurguard.vocab import LABELS, UNLABELED

MAX_NOTE_CHARS = 10_000
COLUMNS = "model, digest, fit_id, class_index, component, label, note, updated"


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


class LabelDB(ABC):
    """The labels of one store; safe to use from any number of threads (and processes)."""

    def set(
        self, model: str, digest: str, fit_id: str, class_index: int, component: int, label: str, note: str
    ) -> Label:
        """Upsert a label; `unlabeled` deletes the row, so unlabeled is simply the absence of one."""
        check_label(label)
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            raise InvalidInput(f"note must be a string of at most {MAX_NOTE_CHARS} characters")
        record = Label(model, digest, fit_id, int(class_index), int(component), label, note, utc_now())
        if label == UNLABELED:
            record = Label(*key_of(record), UNLABELED, "", record.updated)
        self._write(record)
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
        return self._select(
            model, digest, fit_id, None if class_index is None else int(class_index),
            None if label is None else check_label(label),
        )

    @abstractmethod
    def _write(self, record: Label) -> None:
        """Store `record` (replacing that component's row), or delete the row if it is unlabeled;
        announced (see `announce`) with the write."""

    @abstractmethod
    def _select(self, model: str, digest: str, fit_id: str, class_index: int | None, label: str | None) -> list[Label]:
        """The rows of one fit, ordered by (class, component), filtered by what is not None."""

    @abstractmethod
    def carry(self, model: str, digest: str, source_fit: str, target_fit: str, classes: Iterable[int]) -> None:
        """Copy the labels of `classes` from one fit to another (classes whose components are identical)."""

    @abstractmethod
    def forget_fit(self, model: str, digest: str, fit_id: str) -> None:
        """Drop every label of a fit id (a new fit reusing an abandoned id must start unlabeled)."""

    @abstractmethod
    def announce(self, model: str, digest: str, fit_id: str) -> None:
        """Tell the other servers sharing this database that these weights' labels or current fit
        changed (a no-op where they poll instead)."""

    @abstractmethod
    def rows(self) -> Iterator[Label]:
        """Every stored label (what a migration to another database copies)."""


def key_of(record: Label) -> tuple[str, str, str, int, int]:
    """A label row's primary key."""
    return record.model, record.digest, record.fit_id, record.class_index, record.component
