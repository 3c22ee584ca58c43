"""Crash-safe file primitives: every file the store writes appears whole or not at all.

Why: a server killed mid-write (OOM, SIGKILL, power loss) must leave the previous state
readable. Data goes to a hidden temp file in the destination's directory (same filesystem, so
the rename is atomic), is fsynced, then `os.replace`d over the final name, and the directory is
fsynced so the rename itself survives a power loss. Readers only ever open final names.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Make renames, links and unlinks inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path) -> None:
    """Create `directory` and missing parents, each new entry made durable in its parent."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # a concurrent writer made it first
            continue
        fsync_dir(path.parent)


def _temp_path(path: Path) -> tuple[int, Path]:
    fd, name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    return fd, Path(name)


def _publish(tmp: Path, path: Path) -> None:
    """Rename a fully written temp file over `path`; on any failure the temp file is removed."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    fd, tmp = _temp_path(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, path)


def write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Atomically replace `path` with what `write` puts into the temp path it is given (for
    writers that insist on a path, such as the ONNX exporter)."""
    fd, tmp = _temp_path(path)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Atomically replace `path` with `obj` as UTF-8 JSON (NaN refused: it is not JSON)."""
    write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def link_or_copy(src: Path, dst: Path) -> None:
    """Atomically make `dst` a hard link to `src` (no copy), or a copy where links are unsupported.

    Safe to share inodes because the store never writes a file in place: every update is a
    rename of a new file, so the other name keeps the old content.
    """
    fd, tmp = _temp_path(dst)
    os.close(fd)
    try:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _publish(tmp, dst)


def remove_temps(directory: Path, older_than_s: float = 0.0) -> None:
    """Delete temp files a killed writer left behind: all of them while holding the directory's
    writer lock, else only those older than `older_than_s` (no live writer takes that long)."""
    cutoff = time.time() - older_than_s
    for path in directory.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
        try:
            if older_than_s <= 0 or path.stat().st_mtime < cutoff:
                path.unlink()
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue


def try_lock(path: Path) -> int | None:
    """An exclusive flock on `path` (created if missing) as an open fd, or None while another
    holder has it. Closing the fd releases it, and so does the kernel when the process dies:
    a lock left behind by a kill -9 is free again at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
