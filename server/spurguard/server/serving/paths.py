"""Which server-side folders a client may name (Fit and Evaluate datasets).

Why: a request's path is read by the server with the server's rights, so only folders under the
operator's `--data-root`s are allowed, checked after resolving symlinks and `..` (realpath), so
a link inside a root cannot point out of it. No root configured means no dataset at all.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from spurguard.server.errors import InvalidInput, NotFound, PermissionDenied


class DataRoots:
    """The allowed dataset roots; relative request paths are looked up under them, in order."""

    def __init__(self, roots: Sequence[str | os.PathLike[str]]) -> None:
        self.roots = [Path(os.path.realpath(root)) for root in roots]

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
        if not any(real.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(root) for root in self.roots)
            raise PermissionDenied(f"{what} {path!r} is outside the server's data roots ({allowed})")
        if not real.is_dir():
            raise NotFound(f"{what} {path!r} does not exist on the server or is not a folder")
        return real
