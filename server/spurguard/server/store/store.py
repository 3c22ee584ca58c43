"""The store: one directory with every fit, keyed by model name + weights digest, and a database
of labels and job records (SQLite inside the directory, or PostgreSQL: store/database.py).

Why keyed by digest: components describe one set of weights. A model whose weights (or classes,
or preprocessing) changed gets a new digest, finds no fit, and is told to refit instead of
silently scoring with another model's components.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound
from spurguard.server.store.atomic import (
    fsync_dir,
    make_dirs,
    read_json,
    remove_temps,
    try_lock,
    write_json,
    write_with,
)
from spurguard.server.store.changes import ChangeFeed
from spurguard.server.store.database import SQLITE, open_database
from spurguard.server.store.fits import Fit, FitMeta, FitSettings, FitWriter, clear_leftovers
from spurguard.server.store.labels import UNLABELED, Label, check_filter, check_label
from spurguard.server.store.transfers import StoredTransfer, TransferSettings, TransferWriter
from spurguard.server.store.layout import (
    CURRENT,
    LOCK,
    MANIFEST,
    SETTINGS,
    ModelPaths,
    new_id,
    short,
)

# A temp file outside a locked fit folder is only removed at start-up once this old: a replica
# sharing the store may be writing it (exporting an ONNX graph takes minutes, not an hour).
STALE_TEMP_S = 3600.0


def _index(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _last_change(directory: Path) -> float:
    """When anything in `directory` last changed (its files' newest mtime)."""
    return max((p.stat().st_mtime for p in directory.iterdir()), default=directory.stat().st_mtime)


def onnx_graph(root: Path, model: str, digest: str, export: Callable[[Path], None]) -> Path:
    """`Store.onnx_graph` without opening the store's database (the shards of a sharded fit)."""
    path = ModelPaths.of(root, model, digest).onnx
    if not path.is_file():
        make_dirs(path.parent)
        write_with(path, export)
    return path


class Store:
    """Fits under one root directory, labels and job records in the database `labels` names
    (`sqlite`: inside the root); safe for concurrent use by threads and processes.

    `changes` is the feed of what other servers change, where the database pushes it (None:
    SQLite, servers poll). `close` releases what the database holds open."""

    def __init__(self, root: str | os.PathLike[str], labels: str = SQLITE) -> None:
        self.root = Path(root)
        make_dirs(self.root / "models")
        self.database = open_database(labels, self.root)
        self.labels = self.database.labels
        self.jobs = self.database.jobs

    @property
    def changes(self) -> ChangeFeed | None:
        return self.database.changes

    def close(self) -> None:
        self.database.close()

    def remove_leftovers(self, keep_unfinished_days: float) -> list[str]:
        """What killed processes left, removed at start-up; returns the unfinished fits it deleted.

        In every fit folder no live writer holds: temp files and the scratch folder, and the
        whole folder if it is an unfinished fit that has not changed for `keep_unfinished_days`
        (until then it can be resumed). Elsewhere: temp files older than STALE_TEMP_S.
        """
        cutoff = time.time() - keep_unfinished_days * 86400
        removed = []
        for digest_dir in (self.root / "models").glob("*/*"):
            for folder in (digest_dir, digest_dir / "evaluations"):
                remove_temps(folder, STALE_TEMP_S)
            for fit_dir in sorted([*(digest_dir / "fits").glob("*"), *(digest_dir / "transfers").glob("*")]):
                lock_fd = try_lock(fit_dir / LOCK)
                if lock_fd is None:
                    continue  # a live job is writing it
                try:
                    clear_leftovers(fit_dir)
                    if not (fit_dir / MANIFEST).exists() and _last_change(fit_dir) < cutoff:
                        shutil.rmtree(fit_dir)
                        fsync_dir(fit_dir.parent)
                        removed.append(f"{digest_dir.parent.name}/{fit_dir.name}")
                finally:
                    os.close(lock_fd)
        return removed

    def _paths(self, model: str, digest: str) -> ModelPaths:
        return ModelPaths.of(self.root, model, digest)

    # ---- reading fits ----

    def current_fit_id(self, model: str, digest: str) -> str | None:
        """The fit in use for these weights, or None if they were never fitted."""
        try:
            return str(read_json(self._paths(model, digest).current)["fit_id"])
        except FileNotFoundError:
            return None

    def _require_current(self, model: str, digest: str) -> str:
        fit_id = self.current_fit_id(model, digest)
        if fit_id is not None:
            return fit_id
        others = sorted(
            p.parent.name for p in (self.root / "models" / model).glob(f"*/{CURRENT}") if p.parent.name != digest
        )
        hint = (
            f" (fits exist for other weights: digest {', '.join(map(short, others))}; they are never reused)"
            if others
            else ""
        )
        raise FailedPrecondition(
            f"model {model} has no fit for its current weights (digest {short(digest)}); run fit{hint}"
        )

    def load_fit(self, model: str, digest: str, fit_id: str | None = None) -> Fit:
        """A committed fit (the current one by default); components are read per class on demand."""
        paths = self._paths(model, digest)
        return Fit.read(paths, fit_id if fit_id is not None else self._require_current(model, digest))

    def list_fits(self, model: str, digest: str) -> list[FitMeta]:
        """Committed fits of these weights, oldest first."""
        paths = self._paths(model, digest)
        metas = [Fit.read(paths, p.parent.name).meta for p in paths.fits.glob(f"*/{MANIFEST}")]
        return sorted(metas, key=lambda m: (m.created, m.fit_id))

    def pending_fits(self, model: str, digest: str) -> list[str]:
        """Started but uncommitted fits (a killed or cancelled job): resume or discard them."""
        fits = self._paths(model, digest).fits
        return sorted(p.parent.name for p in fits.glob(f"*/{SETTINGS}") if not (p.parent / MANIFEST).exists())

    def set_current(self, model: str, digest: str, fit_id: str) -> None:
        """Switch to another committed fit (roll back, or finish a commit cut short by a crash)."""
        paths = self._paths(model, digest)
        Fit.read(paths, fit_id)
        write_json(paths.current, {"fit_id": fit_id})
        self.labels.announce(model, digest, fit_id)

    # ---- transfers ----

    def current_transfer_id(self, model: str, digest: str) -> str | None:
        """The transfer these weights apply, or None."""
        try:
            return str(read_json(self._paths(model, digest).current_transfer)["transfer_id"])
        except FileNotFoundError:
            return None

    def load_transfer(self, model: str, digest: str, transfer_id: str) -> StoredTransfer:
        """A committed transfer (NOT_FOUND if there is none of that id)."""
        return StoredTransfer.read(self._paths(model, digest), transfer_id)

    def has_transfer(self, model: str, digest: str, transfer_id: str) -> bool:
        return (self._paths(model, digest).transfer(transfer_id) / MANIFEST).is_file()

    def begin_transfer(self, model: str, digest: str, transfer_id: str, settings: TransferSettings) -> TransferWriter:
        """Start, or resume after its finished classes, the uncommitted transfer `transfer_id`."""
        return TransferWriter.open(self._paths(model, digest), transfer_id, settings)

    def set_current_transfer(self, model: str, digest: str, transfer_id: str) -> None:
        """Apply another committed transfer (one made earlier from the same source state, say)."""
        paths = self._paths(model, digest)
        StoredTransfer.read(paths, transfer_id)
        write_json(paths.current_transfer, {"transfer_id": transfer_id})

    # ---- evaluations ----

    def save_evaluation(self, model: str, digest: str, record: dict[str, Any]) -> str:
        """Keep a finished evaluation (written whole or not at all, never half); returns its id."""
        paths = self._paths(model, digest)
        evaluation_id = new_id()
        make_dirs(paths.evaluations)
        write_json(paths.evaluation(evaluation_id), {**record, "evaluation_id": evaluation_id})
        return evaluation_id

    def list_evaluations(self, model: str, digest: str) -> list[dict[str, Any]]:
        """The kept evaluations of these weights, oldest first (ids order by time to the millisecond)."""
        folder = self._paths(model, digest).evaluations
        return [read_json(path) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []

    # ---- exported graphs ----

    def onnx_graph(self, model: str, digest: str, export: Callable[[Path], None]) -> Path:
        """These weights' backbone as ONNX, exported with `export(path)` the first time (written
        whole or not at all) and reused after; keyed by the digest like everything else."""
        return onnx_graph(self.root, model, digest, export)

    # ---- writing fits ----

    def begin_fit(
        self,
        model: str,
        digest: str,
        *,
        dataset_root: str | os.PathLike[str],
        num_components: int,
        feature_dim: int,
        info: dict[str, Any] | None = None,
        fit_id: str | None = None,
    ) -> FitWriter:
        """Start a fit, or resume the uncommitted `fit_id` if it was started with the same settings."""
        settings = FitSettings(os.fspath(dataset_root), num_components, feature_dim, info or {})
        return FitWriter.open(self._paths(model, digest), fit_id or new_id(), settings, self.labels)

    def resume_fit(self, model: str, digest: str, fit_id: str) -> FitWriter:
        """Re-open an uncommitted fit with its stored settings; `done_classes` says what is left."""
        return FitWriter.open(self._paths(model, digest), fit_id, None, self.labels)

    def extend_fit(
        self, model: str, digest: str, *, base_fit_id: str | None = None, fit_id: str | None = None
    ) -> FitWriter:
        """A new fit holding the base fit's classes (hard links, no copy) plus the ones added now.

        Same dataset root and settings as the base, since image ids are relative to it. Classes
        carried unchanged keep their labels; a class added again is refitted, and its labels follow
        their eigenvectors (store.carry).
        """
        base = self.load_fit(model, digest, base_fit_id).meta
        settings = FitSettings(base.dataset_root, base.num_components, base.feature_dim, base.info, base.fit_id)
        return FitWriter.open(self._paths(model, digest), fit_id or new_id(), settings, self.labels)

    # ---- labels ----

    def _fit_and_class(
        self, model: str, digest: str, fit_id: str | None, class_index: int | None, component: int | None = None
    ) -> Fit:
        """The fit (the current one by default); the class and component, where given, must be in it."""
        check_filter(class_index, component)
        fit = self.load_fit(model, digest, fit_id)
        if class_index is not None:
            num = fit.summary(_index(class_index, "class")).num_components
            if component is not None and _index(component, "component") >= num:
                raise NotFound(
                    f"class {class_index} has {num} components in fit {fit.fit_id}; no component {component}"
                )
        return fit

    def set_label(
        self,
        model: str,
        digest: str,
        class_index: int,
        component: int,
        label: str,
        note: str = "",
        *,
        fit_id: str | None = None,
        author: str = "",
    ) -> Label:
        """Label one component of a fit (the current one by default); `unlabeled` clears it.
        `author`: who did (the caller's token name)."""
        check_label(label)
        fit = self._fit_and_class(model, digest, fit_id, class_index, component)
        return self.labels.set(model, digest, fit.fit_id, class_index, component, label, note, author=author)

    def list_labels(
        self,
        model: str,
        digest: str,
        *,
        fit_id: str | None = None,
        class_index: int | None = None,
        label: str | None = None,
        component: int | None = None,
    ) -> list[Label]:
        """Labels of a fit (current by default), optionally one class (and one of its components)
        and one label value.

        `label="unlabeled"` lists the fit's components nobody has labeled yet (updated = None).
        """
        if label is not None:
            check_label(label)
        fit = self._fit_and_class(model, digest, fit_id, class_index, component)
        if label != UNLABELED:
            return self.labels.query(model, digest, fit.fit_id, class_index, label, component)
        done = {(x.class_index, x.component) for x in self.labels.query(
            model, digest, fit.fit_id, class_index, component=component)}
        return [
            Label(model, digest, fit.fit_id, k, c, UNLABELED, "", None)
            for k in (fit.classes if class_index is None else (class_index,))
            for c in (range(fit.summary(k).num_components) if component is None else (component,))
            if (k, c) not in done
        ]

    def label_history(
        self,
        model: str,
        digest: str,
        *,
        fit_id: str | None = None,
        class_index: int | None = None,
        component: int | None = None,
    ) -> list[Label]:
        """Every label write of a fit (current by default), unlabeled ones too, oldest first;
        optionally one class (and one of its components)."""
        fit = self._fit_and_class(model, digest, fit_id, class_index, component)
        return self.labels.history(model, digest, fit.fit_id, class_index, component)

    def label_map(self, model: str, digest: str, fit_id: str) -> dict[tuple[int, int], str]:
        """(class, component) -> label of every labelled component of a fit: one query, the fit
        itself is not read (what a Guard is built on, and checked against)."""
        return {(r.class_index, r.component): r.label for r in self.labels.query(model, digest, fit_id)}

    def spurious_components(self, model: str, digest: str) -> dict[int, list[int]]:
        """Class -> component indices labeled spurious in the current fit (what SpuFix removes)."""
        fit_id = self._require_current(model, digest)
        spurious: dict[int, list[int]] = {}
        for record in self.labels.query(model, digest, fit_id, label="spurious"):
            spurious.setdefault(record.class_index, []).append(record.component)
        return spurious

