"""Partial statistics of a sharded fit: what each shard of a Kubernetes Indexed Job writes, and
what the merge reads back.

```
fits/<fit_id>/shards/<I>-of-<N>.json          shard I's record, written last: the shard is done
fits/<fit_id>/shards/<I>-of-<N>.lock          flock of the run writing shard I (and of the merge)
fits/<fit_id>/shards/<I>-of-<N>.<run>/        one run's files:
    class_<k>.safetensors                     "features" [n, d] float32 of the shard's images of
                                              class k; with "mean" and "scatter" (float64) when
                                              the shard had more than d of them
    .spill/                                   the run's feature spill while it runs
```
Why this shape: shards run at once on different machines and share nothing but the volume, so
each writes only its own names, and a shard is done exactly when its record exists. A re-run of
a shard writes a fresh run folder and then replaces the record in one rename, so the merge sees
the old output or the new one, never a mix; the folder the record no longer names is removed.
No database is touched: N pods opening one SQLite file on a network volume is what breaks.
The features are kept because the fit-image alphas need them once the merged eigenvectors are
known; a class that kept its rows (n <= d) needs nothing else, since its rows are those features.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import safe_open

from spurguard.server.errors import FailedPrecondition
from spurguard.server.store.atomic import fsync_dir, make_dirs, read_json, try_lock, write_json, write_with
from spurguard.server.store.layout import SCRATCH, ModelPaths, check_name, class_tensors

SHARD_FORMAT = 1
SHARDS = "shards"
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class ShardSettings:
    """What every shard of one fit must agree on; the merge refuses shards that differ."""

    model: str
    digest: str
    dataset_root: str
    listing_sha256: str  # of the whole dataset's (class, image id) listing, so all shards split the same one
    images: int  # in that whole listing
    classes: tuple[int, ...]
    num_components: int
    feature_dim: int
    num_shards: int

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ShardSettings:
        return cls(**{**record, "classes": tuple(record["classes"])})


@dataclass(frozen=True)
class ShardPart:
    """One class's partial statistics in one shard."""

    class_index: int
    count: int
    image_ids: tuple[str, ...]
    scatter: bool  # kept as (mean, scatter) beside the features, not as rows
    tensors_sha256: str
    tensors_bytes: int


@dataclass(frozen=True)
class ShardRecord:
    shard: int
    settings: ShardSettings
    directory: Path  # the run folder holding the parts
    images: int  # of the listing in this shard, readable or not
    skipped: tuple[tuple[str, str], ...]  # (image id, why) of unreadable images
    parts: dict[int, ShardPart]


def shard_name(shard: int, num_shards: int) -> str:
    return f"{shard}-of-{num_shards}"


def shards_dir(paths: ModelPaths, fit_id: str) -> Path:
    return paths.fit(fit_id) / SHARDS


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Writes one run of one shard; `commit` makes it that shard's output. Holds the shard's lock."""

    def __init__(self, paths: ModelPaths, fit_id: str, shard: int, settings: ShardSettings) -> None:
        check_name(fit_id, "fit id")
        if not 0 <= shard < settings.num_shards:
            raise FailedPrecondition(f"shard {shard} out of range for {settings.num_shards} shards")
        self.settings = settings
        self.shard = shard
        self._root = shards_dir(paths, fit_id)
        self._name = shard_name(shard, settings.num_shards)
        make_dirs(self._root)
        lock_fd = try_lock(self._root / f"{self._name}.lock")
        if lock_fd is None:
            raise FailedPrecondition(f"shard {self._name} of fit {fit_id} is being written by another run")
        self._lock_fd: int | None = lock_fd
        self._remove_runs(keep=self._current_run())  # what a killed run of this shard left
        self.directory = self._root / f"{self._name}.{secrets.token_hex(4)}"
        self.directory.mkdir()
        self._parts: list[ShardPart] = []

    def _current_run(self) -> str | None:
        try:
            return str(read_json(self._root / f"{self._name}.json")["run"])
        except FileNotFoundError:
            return None

    def _remove_runs(self, keep: str | None) -> None:
        for run in self._root.glob(f"{self._name}.*"):
            if run.is_dir() and run.name != keep:
                shutil.rmtree(run, ignore_errors=True)

    @property
    def parts(self) -> list[ShardPart]:
        """The parts written so far, in order."""
        return list(self._parts)

    @property
    def spill_dir(self) -> Path:
        """Where this run may keep temporary files; removed at commit or close."""
        path = self.directory / SCRATCH
        path.mkdir(exist_ok=True)
        return path

    def add_part(
        self,
        class_index: int,
        image_ids: Sequence[str],
        features: np.ndarray,
        scatter: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Persist one class's part: its features [n, d], and (mean, scatter) when it kept those."""
        tensors = {"features": np.ascontiguousarray(features, dtype=np.float32)}
        if scatter is not None:
            tensors["mean"], tensors["scatter"] = (np.ascontiguousarray(a, dtype=np.float64) for a in scatter)
        path = class_tensors(self.directory, class_index)
        write_with(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp))
        self._parts.append(ShardPart(class_index, len(image_ids), tuple(image_ids), scatter is not None,
                                     _sha256(path), path.stat().st_size))

    def commit(self, images: int, skipped: Sequence[tuple[str, str]]) -> None:
        """Make this run the shard's output (one rename) and remove the run it replaces."""
        shutil.rmtree(self.directory / SCRATCH, ignore_errors=True)
        record = {
            "format": SHARD_FORMAT,
            "settings": asdict(self.settings),
            "shard": self.shard,
            "run": self.directory.name,
            "images": images,
            "skipped": list(skipped),
            "parts": [asdict(part) for part in self._parts],
        }
        write_json(self._root / f"{self._name}.json", record)
        self._remove_runs(keep=self.directory.name)
        self._release()

    def close(self) -> None:
        """Without commit: drop this run's files (the shard's earlier output, if any, stays)."""
        if self._lock_fd is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._release()

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_record(root: Path, shard: int, num_shards: int) -> ShardRecord:
    record = read_json(root / f"{shard_name(shard, num_shards)}.json")
    if record.get("format") != SHARD_FORMAT:
        raise FailedPrecondition(f"shard {shard_name(shard, num_shards)}: unsupported format {record.get('format')!r}")
    parts = [ShardPart(**{**part, "image_ids": tuple(part["image_ids"])}) for part in record["parts"]]
    return ShardRecord(
        shard=int(record["shard"]),
        settings=ShardSettings.from_json(record["settings"]),
        directory=root / str(record["run"]),
        images=int(record["images"]),
        skipped=tuple((str(i), str(why)) for i, why in record["skipped"]),
        parts={part.class_index: part for part in parts},
    )


def missing_shards(paths: ModelPaths, fit_id: str, num_shards: int) -> list[int]:
    """The shards of N that have no record yet."""
    root = shards_dir(paths, fit_id)
    return [i for i in range(num_shards) if not (root / f"{shard_name(i, num_shards)}.json").exists()]


def _describe(settings: ShardSettings, other: ShardSettings) -> str:
    mine, theirs = asdict(settings), asdict(other)
    return ", ".join(f"{key} {theirs[key]!r} vs {mine[key]!r}" for key in mine if mine[key] != theirs[key])


@contextmanager
def locked_shards(paths: ModelPaths, fit_id: str, num_shards: int) -> Iterator[list[ShardRecord]]:
    """Every shard's record, in shard order, while holding every shard's lock (none can be
    rewritten under the merge). A missing, running or disagreeing shard is FailedPrecondition."""
    check_name(fit_id, "fit id")
    missing = missing_shards(paths, fit_id, num_shards)
    if missing:
        names = ", ".join(shard_name(i, num_shards) for i in missing)
        raise FailedPrecondition(
            f"fit {fit_id}: shard(s) {names} not written yet (JOB_COMPLETION_INDEX {', '.join(map(str, missing))}); "
            "run them, then merge"
        )
    root = shards_dir(paths, fit_id)
    locks: list[int] = []
    try:
        for i in range(num_shards):
            fd = try_lock(root / f"{shard_name(i, num_shards)}.lock")
            if fd is None:
                raise FailedPrecondition(f"fit {fit_id}: shard {shard_name(i, num_shards)} is still running")
            locks.append(fd)
        records = [_read_record(root, i, num_shards) for i in range(num_shards)]
        first = records[0].settings
        if first.model != paths.model or first.digest != paths.digest:
            raise FailedPrecondition(
                f"fit {fit_id}: the shards were fitted with model {first.model} digest {first.digest}, "
                f"not {paths.model} digest {paths.digest}"
            )
        for record in records[1:]:
            if record.settings != first:
                raise FailedPrecondition(
                    f"fit {fit_id}: shard {shard_name(record.shard, num_shards)} was run with other settings than "
                    f"shard {shard_name(0, num_shards)} ({_describe(first, record.settings)}); re-run it"
                )
        yield records
    finally:
        for fd in locks:
            os.close(fd)


@contextmanager
def open_part(record: ShardRecord, class_index: int) -> Iterator[Any]:
    """A class part's tensors, memory-mapped (slice "features" to read it in chunks), once their
    checksum matches the record."""
    part = record.parts[class_index]
    path = class_tensors(record.directory, class_index)
    where = f"shard {shard_name(record.shard, record.settings.num_shards)} class {class_index}"
    try:
        intact = path.stat().st_size == part.tensors_bytes and _sha256(path) == part.tensors_sha256
    except FileNotFoundError:
        raise FailedPrecondition(f"{where}: missing file {path.name}; re-run the shard") from None
    if not intact:
        raise FailedPrecondition(f"{where}: {path.name} does not match its record (corrupt store); re-run the shard")
    with safe_open(path, framework="numpy") as tensors:
        yield tensors


def remove_shards(paths: ModelPaths, fit_id: str) -> None:
    """Drop a fit's shard outputs (after the merged fit is committed)."""
    root = shards_dir(paths, fit_id)
    if root.exists():
        shutil.rmtree(root)
        fsync_dir(root.parent)
