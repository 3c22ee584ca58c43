"""Fits on disk: written class by class, committed by a manifest, read lazily per class.

Why this shape: a fit over 1000 classes runs for hours, so each class is persisted as soon as it
is finalized (a killed job keeps its finished classes and can resume), while readers only ever
see committed fits: a fit exists for them once its manifest is written, and becomes the one in
use when `current.json` is atomically switched to it. Committed files are never modified, which
is what lets an extended fit share its base's class files through hard links.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from spurguard.server.engine.components import ClassComponents
from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound
from spurguard.server.store import codec
from spurguard.server.store.atomic import (
    fsync_dir,
    link_or_copy,
    make_dirs,
    read_json,
    remove_temps,
    try_lock,
    write_bytes,
    write_json,
)
from spurguard.server.store.codec import ClassSummary
from spurguard.server.store.faults import crash_point
from spurguard.server.store.carry import LabelCarry, carry_labels
from spurguard.server.store.labels import UNLABELED, LabelDB, utc_now
from spurguard.vocab import LabelCarried
from spurguard.server.store.layout import (
    LOCK,
    MANIFEST,
    SCRATCH,
    SETTINGS,
    ModelPaths,
    check_name,
    class_record,
    class_tensors,
    recorded_classes,
    short,
)


def _positive_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInput(f"{what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class FitSettings:
    """What a fit is started with; resuming must use the same, or one fit would mix two runs."""

    dataset_root: str
    num_components: int
    feature_dim: int
    info: dict[str, Any] = field(default_factory=dict)
    base_fit_id: str | None = None  # set for an extension: the fit whose classes it carries

    def __post_init__(self) -> None:
        if not isinstance(self.dataset_root, str):
            raise InvalidInput(f"dataset_root must be a string, got {self.dataset_root!r}")
        _positive_int(self.num_components, "num_components")
        _positive_int(self.feature_dim, "feature_dim")
        if not isinstance(self.info, dict):
            raise InvalidInput("info must be a JSON object")
        try:  # normalised as stored, so a resume compares equal to what was written
            info = json.loads(json.dumps(self.info, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"info is not JSON-serialisable: {exc}") from None
        object.__setattr__(self, "info", info)
        if self.base_fit_id is not None:
            check_name(self.base_fit_id, "fit id")

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset_root": self.dataset_root,
            "num_components": self.num_components,
            "feature_dim": self.feature_dim,
            "info": self.info,
            "base_fit_id": self.base_fit_id,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> FitSettings:
        return cls(**{f.name: record[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class FitMeta:
    """A committed fit's metadata (the manifest, minus the per-class summaries)."""

    fit_id: str
    model: str
    digest: str
    created: str  # UTC ISO-8601, commit time
    dataset_root: str  # image ids are paths relative to it
    num_components: int  # L requested; a class may keep fewer
    feature_dim: int
    classes: tuple[int, ...]
    info: dict[str, Any]
    base_fit_id: str | None
    label_carry: LabelCarry | None = None  # what became of the labels of the fit this one replaced

    def to_json(self) -> dict[str, Any]:
        carry = None if self.label_carry is None else self.label_carry.to_json()
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "classes": list(self.classes),
                "label_carry": carry}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> FitMeta:
        values = {f.name: record[f.name] for f in fields(cls) if f.name != "label_carry"}
        carry = record.get("label_carry")  # absent from manifests written before labels were carried
        return cls(**{**values, "classes": tuple(values["classes"])},
                   label_carry=None if carry is None else LabelCarry.from_json(carry))


class Fit:
    """A committed fit: metadata and class summaries up front, components read on demand.

    Lazy because a 1000-class fit is gigabytes of vectors and alphas, while most requests touch
    one class; nothing is cached here, so callers decide what to keep in memory.
    """

    def __init__(self, meta: FitMeta, summaries: dict[int, ClassSummary], directory: Path) -> None:
        self.meta = meta
        self.summaries = summaries
        self.directory = directory

    @classmethod
    def read(cls, paths: ModelPaths, fit_id: str) -> Fit:
        manifest = paths.fit(fit_id) / MANIFEST
        try:
            record = read_json(manifest)
        except FileNotFoundError:
            raise NotFound(
                f"model {paths.model} (digest {short(paths.digest)}) has no committed fit {fit_id!r}"
            ) from None
        if record.get("format") != codec.FORMAT_VERSION:
            raise FailedPrecondition(f"{manifest}: unsupported store format {record.get('format')!r}")
        summaries = {s.class_index: s for s in map(ClassSummary.from_json, record["class_summaries"])}
        return cls(FitMeta.from_json(record), summaries, manifest.parent)

    @property
    def fit_id(self) -> str:
        return self.meta.fit_id

    @property
    def classes(self) -> tuple[int, ...]:
        return self.meta.classes

    def __contains__(self, class_index: object) -> bool:
        return class_index in self.summaries

    def summary(self, class_index: int) -> ClassSummary:
        try:
            return self.summaries[class_index]
        except KeyError:
            raise NotFound(
                f"class {class_index} is not fitted for model {self.meta.model} (fit {self.fit_id}); "
                "fit it first"
            ) from None

    def components(self, class_index: int) -> ClassComponents:
        """Read class k's components; the files must be the ones the manifest committed."""
        expected = self.summary(class_index).tensors_sha256
        where = f"model {self.meta.model} fit {self.fit_id} class {class_index}"
        try:
            record = read_json(class_record(self.directory, class_index))
            data = class_tensors(self.directory, class_index).read_bytes()
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"{where}: missing file {Path(exc.filename).name}; run fit") from None
        if record.get("tensors_sha256") != expected:
            raise FailedPrecondition(f"{where}: files differ from the committed manifest; run fit")
        return codec.decode(data, record, where)


def clear_leftovers(directory: Path) -> None:
    """Remove what a killed writer of a fit folder left (temp files, its scratch folder); call
    only while holding the folder's lock."""
    remove_temps(directory)
    shutil.rmtree(directory / SCRATCH, ignore_errors=True)


def unmark_class(directory: Path, class_index: int) -> None:
    """Remove a class's JSON record before its files are rewritten: in between it must not count as done."""
    record_path = class_record(directory, class_index)
    if record_path.exists():
        record_path.unlink()
        fsync_dir(directory)


@contextmanager
def scratch_folder(directory: Path) -> Iterator[Path]:
    """An empty `directory/.scratch` for a run's temporary files (a feature spill), removed after.

    Inside the locked folder rather than in TMPDIR: on the store's disk, and under the writer's
    lock, so that what a killed run left is cleared on resume or at the next start."""
    path = directory / SCRATCH
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def manifest_json(meta: FitMeta, summaries: dict[int, ClassSummary]) -> dict[str, Any]:
    return {
        "format": codec.FORMAT_VERSION,
        **meta.to_json(),
        "class_summaries": [summaries[k].to_json() for k in meta.classes],
    }


class FitWriter:
    """Persists one fit class by class and commits it; holds the fit's exclusive lock while open.

    Open it through `Store.begin_fit`, `resume_fit` or `extend_fit`. Re-opening an uncommitted
    fit_id resumes it: `done_classes` lists what a killed run already finished. Closing without
    commit (or the process dying) keeps the progress; `discard` deletes it. Thread-safe.
    """

    def __init__(self, paths: ModelPaths, fit_id: str, settings: FitSettings, labels: LabelDB, lock_fd: int):
        self.paths = paths
        self.fit_id = fit_id
        self.settings = settings
        self._labels = labels
        self._dir = paths.fit(fit_id)
        self._lock_fd: int | None = lock_fd
        self._mutex = threading.Lock()

    @classmethod
    def open(
        cls, paths: ModelPaths, fit_id: str, settings: FitSettings | None, labels: LabelDB
    ) -> FitWriter:
        """Start (settings given) or resume (settings None: the stored ones) an uncommitted fit."""
        directory = paths.fit(fit_id)
        if settings is None and not (directory / SETTINGS).exists():
            raise NotFound(f"model {paths.model} has no unfinished fit {fit_id!r} to resume")
        make_dirs(directory)
        lock_fd = try_lock(directory / LOCK)
        if lock_fd is None:
            raise FailedPrecondition(f"fit {fit_id} of model {paths.model} is being written by another job")
        try:
            if (directory / MANIFEST).exists():
                raise FailedPrecondition(f"fit {fit_id} of model {paths.model} is already committed")
            try:
                stored = FitSettings.from_json(read_json(directory / SETTINGS))
            except FileNotFoundError:
                stored = None
            if stored is None:
                if settings is None:
                    raise NotFound(f"model {paths.model} has no unfinished fit {fit_id!r} to resume")
                labels.forget_fit(paths.model, paths.digest, fit_id)  # leftovers of an abandoned id
                write_json(directory / SETTINGS, settings.to_json())
            elif settings is not None and settings != stored:
                raise FailedPrecondition(
                    f"fit {fit_id} was started with other settings ({stored.to_json()}); "
                    "resume it with the same ones or start a new fit"
                )
            clear_leftovers(directory)
            writer = cls(paths, fit_id, stored or settings, labels, lock_fd)
            writer._link_base()
        except BaseException:
            os.close(lock_fd)
            raise
        return writer

    def _link_base(self) -> None:
        """Give an extension the base fit's classes it does not have yet, sharing their files."""
        if self.settings.base_fit_id is None:
            return
        base = Fit.read(self.paths, self.settings.base_fit_id)
        done = set(self.done_classes)
        for k in base.classes:
            if k not in done:  # tensors first: the record marks the class done
                link_or_copy(class_tensors(base.directory, k), class_tensors(self._dir, k))
                link_or_copy(class_record(base.directory, k), class_record(self._dir, k))

    @property
    def done_classes(self) -> list[int]:
        """Classes already persisted in this fit (by this writer or a killed earlier run)."""
        return recorded_classes(self._dir)

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise FailedPrecondition(f"fit writer {self.fit_id} is closed")

    def add_class(self, components: ClassComponents) -> None:
        """Persist one finalized class (replacing an earlier version of it) before returning."""
        data, record = codec.encode(components, self.settings.feature_dim, self.settings.num_components)
        k = record["class_index"]
        with self._mutex:
            self._check_open()
            unmark_class(self._dir, k)
            write_bytes(class_tensors(self._dir, k), data)
            write_json(class_record(self._dir, k), record)
        crash_point("class", self.fit_id, k)

    def scratch(self) -> AbstractContextManager[Path]:
        """An empty folder under the fit's lock for this run's feature spill (scratch_folder)."""
        return scratch_folder(self._dir)

    def _summary(self, class_index: int) -> ClassSummary:
        record = read_json(class_record(self._dir, class_index))
        tensors = class_tensors(self._dir, class_index)
        if not tensors.exists() or tensors.stat().st_size != record["tensors_bytes"]:
            raise FailedPrecondition(f"fit {self.fit_id}: class {class_index} is incomplete; add it again")
        return ClassSummary.from_json(record)

    def commit(self, expected_classes: Iterable[int] | None = None) -> FitMeta:
        """Make the fit visible and current; `expected_classes` must all be written by now.

        Order: manifest (the fit now exists), then `current.json` (it is now in use). A crash
        before the manifest leaves the fit pending; between the two, committed but not current.
        """
        with self._mutex:
            self._check_open()
            done = self.done_classes
            missing = sorted(set(expected_classes or ()) - set(done))
            if missing:
                raise FailedPrecondition(f"fit {self.fit_id}: classes {missing} are not written yet")
            if not done:
                raise FailedPrecondition(f"fit {self.fit_id}: no class written, nothing to commit")
            summaries = {k: self._summary(k) for k in done}
            s = self.settings
            meta = FitMeta(
                fit_id=self.fit_id,
                model=self.paths.model,
                digest=self.paths.digest,
                created=utc_now(),
                dataset_root=s.dataset_root,
                num_components=s.num_components,
                feature_dim=s.feature_dim,
                classes=tuple(done),
                info=s.info,
                base_fit_id=s.base_fit_id,
            )
            replaced = s.base_fit_id or self._current_fit_id()
            if replaced is not None and replaced != self.fit_id:
                meta = replace(meta, label_carry=self._carry_labels(replaced, meta, summaries))
            crash_point("commit-manifest", self.fit_id)
            write_json(self._dir / MANIFEST, manifest_json(meta, summaries))
            crash_point("commit-current", self.fit_id)
            write_json(self.paths.current, {"fit_id": self.fit_id})
            self._release()
        self._labels.announce(self.paths.model, self.paths.digest, self.fit_id)  # replicas switch at once
        return meta

    def _current_fit_id(self) -> str | None:
        try:
            return str(read_json(self.paths.current)["fit_id"])
        except FileNotFoundError:
            return None

    def _carry_labels(self, replaced: str, meta: FitMeta, summaries: dict[int, ClassSummary]) -> LabelCarry:
        """The replaced fit's labels onto this one (see store.carry): as they are for the classes an
        extension carries unchanged (same tensor checksum), by eigenvector match for the others."""
        model, digest = self.paths.model, self.paths.digest
        base = Fit.read(self.paths, replaced)
        same = {k for k, s in summaries.items() if k in base and base.summary(k) == s}
        self._labels.carry(model, digest, replaced, self.fit_id, sorted(same))
        labels = [r for r in self._labels.query(model, digest, replaced) if r.label != UNLABELED]
        kept = [LabelCarried(r.class_index, r.component, r.component, r.label, 1.0)
                for r in labels if r.class_index in same]
        others = [r for r in labels if r.class_index not in same]
        new = Fit(meta, summaries, self._dir)
        classes = {r.class_index for r in others}
        carried, not_carried = carry_labels(
            self._labels, self.fit_id, others,
            {k: base.components(k).vectors for k in classes},
            {k: new.components(k).vectors for k in classes if k in new},
        )
        return LabelCarry(replaced, tuple(kept + carried), tuple(not_carried))

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Release the fit without committing; its finished classes stay for a resume."""
        with self._mutex:
            self._release()

    def discard(self) -> None:
        """Delete this uncommitted fit and everything written for it."""
        with self._mutex:
            self._check_open()
            shutil.rmtree(self._dir)
            fsync_dir(self._dir.parent)
            self._release()

    def __enter__(self) -> FitWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
