"""Which server-side files a client may make the server read (Fit and Evaluate datasets, and
the fit images Visualize reads back).

Why: a request's path is read by the server with the server's rights, so only files under the
operator's `--data-root`s may be read, checked by their real path (symlinks and `..` resolved),
so that a link inside a root cannot lead out of it. Links that stay inside the roots are fine
(datasets are often assembled from links into a shared image folder). No root configured means
no dataset at all.

Every file is checked where it is read, not only where it is listed: a file swapped for a link
after a fit's listing (or after the fit) is refused when it is read. The check resolves the path
once and opens the resolved path with O_NOFOLLOW, so the file read is the file checked (the
last component cannot be swapped for a link in between; only a folder swapped for a link in the
instant between the two can slip by, which needs write access to the root itself).
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from spurguard.server.errors import InvalidInput, NotFound, PermissionDenied, ResourceExhausted


class DataRoots:
    """The allowed dataset roots; relative request paths are looked up under them, in order."""

    def __init__(self, roots: Sequence[str | os.PathLike[str]]) -> None:
        self.roots = [Path(os.path.realpath(root)) for root in roots]

    def _allowed(self) -> str:
        return ", ".join(str(root) for root in self.roots)

    def resolve(self, path: str, what: str = "dataset") -> Path:
        """The real path of the folder `path`: PERMISSION_DENIED outside the roots, NOT_FOUND if absent."""
        if not path:
            raise InvalidInput(f"{what} path is empty")
        if "\x00" in path:  # no file system takes it: os calls would raise ValueError
            raise InvalidInput(f"{what} path contains a NUL character")
        if not self.roots:
            raise PermissionDenied(f"this server allows no {what} paths; start it with --data-root DIR")
        try:
            return self._resolve(path, what)
        except OSError as error:
            if error.errno == errno.ENAMETOOLONG:  # the request's fault, not the server's
                raise InvalidInput(f"{what} path is too long for the server's file system ({len(path)} characters)") from None
            raise

    def _resolve(self, path: str, what: str) -> Path:
        if os.path.isabs(path):
            candidate = Path(path)
        else:
            under = [root / path for root in self.roots]
            candidate = next((p for p in under if p.exists()), under[0])
        real = Path(os.path.realpath(candidate))
        if not self._inside(real):
            raise PermissionDenied(f"{what} {path!r} is outside the server's data roots ({self._allowed()})")
        if not real.is_dir():
            raise NotFound(f"{what} {path!r} does not exist on the server or is not a folder")
        return real

    def _inside(self, real: Path) -> bool:
        return any(real.is_relative_to(root) for root in self.roots)

    def real_path(self, path: Path, what: str = "dataset file") -> Path:
        """The real path of `path`; PERMISSION_DENIED, naming `path` (the link), if it leads out of the roots
        (or, say for the fit of a server started with other roots, lies outside them)."""
        real = Path(os.path.realpath(path))
        if not self._inside(real):
            where = "is a link that leads" if self._inside(Path(os.path.abspath(path))) else "is"
            raise PermissionDenied(f"{what} {str(path)!r} {where} outside the server's data roots ({self._allowed()})")
        return real

    def check_listing(self, paths: Iterable[Path]) -> None:
        """Every listed file leads inside the roots, else PERMISSION_DENIED naming the first link out.

        Checked before a fit or an evaluation reads anything, so that one escaping link refuses
        the whole request rather than failing it halfway. One realpath per folder and one lstat
        per file: a file that is not a link lies wherever its folder really is.
        """
        folders: set[Path] = set()
        for path in paths:
            if path.parent not in folders:
                self.real_path(path.parent, "dataset folder")
                folders.add(path.parent)
            if path.is_symlink():
                self.real_path(path)

    def read(self, path: Path, max_bytes: int | None = None, what: str = "dataset file") -> bytes:
        """The bytes of the file `path`, read from its checked real path (see the module's docstring).

        NOT_FOUND if it is gone, RESOURCE_EXHAUSTED over `max_bytes`, PERMISSION_DENIED outside the roots.
        """
        real = self.real_path(path, what)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{what} {str(path)!r} does not exist any more") from None
        except OSError as error:
            if error.errno == errno.ELOOP:  # swapped for a link since realpath
                raise PermissionDenied(f"{what} {str(path)!r} turned into a link while it was being read") from None
            raise
        with open(fd, "rb") as file:
            size = os.fstat(fd).st_size
            if max_bytes is not None and size > max_bytes:
                raise ResourceExhausted(f"{what} {str(path)!r} is {size} bytes, over the limit of {max_bytes}")
            return file.read()
