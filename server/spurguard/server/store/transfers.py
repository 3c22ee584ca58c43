"""Transfers on disk: a target model's directions carried from a source model's labels (SPEC §1).

Laid out like a fit, and for the same reasons: each class is persisted as soon as its directions
are final (a cancelled or killed transfer resumes after its finished classes), a manifest written
last commits the transfer, and `transfer.json` (replaced atomically) says which one the target
applies. A transfer is keyed by the target's digest (its folder) and by the source state it came
from (its id: source model, digest and fit, the spurious labels carried, the classes asked), so
the same source state always finds the same stored transfer, and re-labelling the source makes a
new one instead of changing this one.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from spurguard.server.engine.transfer import TransferredClass
from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound
from spurguard.server.store.atomic import make_dirs, read_json, try_lock, write_bytes, write_json
from spurguard.server.store.codec import FORMAT_VERSION
from spurguard.server.store.fits import clear_leftovers, scratch_folder, unmark_class
from spurguard.server.store.labels import utc_now
from spurguard.server.store.layout import (
    LOCK,
    MANIFEST,
    SETTINGS,
    ModelPaths,
    class_record,
    class_tensors,
    recorded_classes,
    short,
)

_TENSORS = {"mean": np.float64, "directions": np.float64, "covariance": np.float64, "alphas": np.float32}


@dataclass(frozen=True)
class TransferSettings:
    """The source state a transfer is made from; resuming must find the same."""

    source_model: str
    source_digest: str
    source_fit: str
    classes: tuple[int, ...]  # classes with directions, ascending
    labels_snapshot: str  # digest of the spurious (class, component) pairs carried
    labels: tuple[dict[str, Any], ...]  # those labels as records (class_index, component, note, updated, ...)

    def to_json(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "classes": list(self.classes),
                "labels": list(self.labels)}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TransferSettings:
        values = {f.name: record[f.name] for f in fields(cls)}
        return cls(**{**values, "classes": tuple(values["classes"]), "labels": tuple(values["labels"])})


@dataclass(frozen=True)
class StoredTransfer:
    """A committed transfer: its settings, when it was made, and every class's directions."""

    transfer_id: str
    settings: TransferSettings
    created: str  # UTC ISO-8601, commit time
    classes: dict[int, TransferredClass]

    @classmethod
    def read(cls, paths: ModelPaths, transfer_id: str) -> StoredTransfer:
        directory = paths.transfer(transfer_id)
        try:
            manifest = read_json(directory / MANIFEST)
        except FileNotFoundError:
            raise NotFound(f"model {paths.model} (digest {short(paths.digest)}) has no transfer {transfer_id!r}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise FailedPrecondition(f"transfer {transfer_id}: unsupported store format {manifest.get('format')!r}")
        checksums = {int(k): str(v) for k, v in manifest["tensors_sha256"].items()}
        classes = {k: _read_class(directory, k, checksums[k]) for k in sorted(checksums)}
        return cls(transfer_id, TransferSettings.from_json(manifest["settings"]), str(manifest["created"]), classes)


def _encode(moved: TransferredClass) -> tuple[bytes, dict[str, Any]]:
    arrays = {name: np.ascontiguousarray(getattr(moved, name), dtype=dtype) for name, dtype in _TENSORS.items()}
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise InvalidInput(f"class {moved.class_index}: transferred directions have non-finite values")
    data = safetensors.numpy.save(arrays)
    record = {
        "format": FORMAT_VERSION,
        "class_index": int(moved.class_index),
        "count": int(moved.count),
        "source_components": [int(c) for c in moved.source_components],
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    return data, record


def _read_class(directory: Path, class_index: int, expected: str) -> TransferredClass:
    where = f"transfer {directory.name} class {class_index}"
    try:
        record = read_json(class_record(directory, class_index))
        data = class_tensors(directory, class_index).read_bytes()
    except FileNotFoundError as exc:
        raise FailedPrecondition(f"{where}: missing file {Path(exc.filename).name}; transfer again") from None
    if record.get("tensors_sha256") != expected or hashlib.sha256(data).hexdigest() != expected:
        raise FailedPrecondition(f"{where}: files differ from the committed manifest; transfer again")
    tensors = safetensors.numpy.load(data)
    return TransferredClass(
        class_index=int(record["class_index"]),
        source_components=tuple(int(c) for c in record["source_components"]),
        count=int(record["count"]),
        **{name: tensors[name] for name in _TENSORS},
    )


class TransferWriter:
    """Persists one transfer class by class and commits it; holds its folder's lock while open.

    Opening an uncommitted id again resumes it (`done_classes`); the settings must be the same.
    """

    def __init__(self, paths: ModelPaths, transfer_id: str, settings: TransferSettings, lock_fd: int) -> None:
        self.paths = paths
        self.transfer_id = transfer_id
        self.settings = settings
        self._dir = paths.transfer(transfer_id)
        self._lock_fd: int | None = lock_fd

    @classmethod
    def open(cls, paths: ModelPaths, transfer_id: str, settings: TransferSettings) -> TransferWriter:
        directory = paths.transfer(transfer_id)
        make_dirs(directory)
        lock_fd = try_lock(directory / LOCK)
        if lock_fd is None:
            raise FailedPrecondition(f"transfer {transfer_id} to model {paths.model} is being written by another job")
        try:
            if (directory / MANIFEST).exists():
                raise FailedPrecondition(f"transfer {transfer_id} to model {paths.model} is already committed")
            try:
                stored = TransferSettings.from_json(read_json(directory / SETTINGS))
            except FileNotFoundError:
                write_json(directory / SETTINGS, settings.to_json())
            else:
                if stored.to_json() != settings.to_json():
                    raise FailedPrecondition(f"transfer {transfer_id} was started from another source state")
            clear_leftovers(directory)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(paths, transfer_id, settings, lock_fd)

    @property
    def done_classes(self) -> list[int]:
        """Classes already persisted (by this writer or a cancelled or killed earlier run)."""
        return recorded_classes(self._dir)

    def scratch(self) -> AbstractContextManager[Path]:
        """An empty folder under the transfer's lock for this run's feature spill (scratch_folder)."""
        return scratch_folder(self._dir)

    def add_class(self, moved: TransferredClass) -> None:
        """Persist one class's directions before returning (the JSON record, written last, marks it done)."""
        data, record = _encode(moved)
        unmark_class(self._dir, moved.class_index)
        write_bytes(class_tensors(self._dir, moved.class_index), data)
        write_json(class_record(self._dir, moved.class_index), record)

    def commit(self) -> StoredTransfer:
        """Write the manifest (the transfer now exists), then make it the target's transfer in use."""
        missing = sorted(set(self.settings.classes) - set(self.done_classes))
        if missing:
            raise FailedPrecondition(f"transfer {self.transfer_id}: classes {missing} are not written yet")
        checksums = {str(k): read_json(class_record(self._dir, k))["tensors_sha256"] for k in self.settings.classes}
        write_json(self._dir / MANIFEST, {"format": FORMAT_VERSION, "created": utc_now(),
                                          "settings": self.settings.to_json(), "tensors_sha256": checksums})
        write_json(self.paths.current_transfer, {"transfer_id": self.transfer_id})
        self.close()
        return StoredTransfer.read(self.paths, self.transfer_id)

    def close(self) -> None:
        """Release the folder; finished classes stay for a resume."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> TransferWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
