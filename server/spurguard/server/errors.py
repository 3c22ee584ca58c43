"""Typed errors of the server side, each carrying the gRPC status code it maps to.

The engine, backends and store raise these and never import grpc; `error_status` turns any
exception into the status a client sees (the rpc layer only maps its code name to grpc's).
"""
from __future__ import annotations

import logging

from spurguard.vocab import ErrorStatus

log = logging.getLogger("spurguard.server")


class SpurguardError(Exception):
    """Base of every error a client may see; the message is one line, meant for people."""

    code: str = "INTERNAL"


class InvalidInput(SpurguardError):
    """The request itself is wrong: a corrupt image, a bad shape, an unknown option."""

    code = "INVALID_ARGUMENT"


class NotFound(SpurguardError):
    """An unknown model, class, component or file."""

    code = "NOT_FOUND"


class FailedPrecondition(SpurguardError):
    """The request is valid but the state is not ready for it (e.g. a class not fitted yet)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(SpurguardError):
    """Input over a configured limit: too many pixels, too many bytes, too large a batch."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(SpurguardError):
    """The model or backend is not ready (still loading, shutting down, Triton unreachable)."""

    code = "UNAVAILABLE"


class PermissionDenied(SpurguardError):
    """Not allowed: a path outside the server's data roots, or a call above the token's role."""

    code = "PERMISSION_DENIED"


class Unauthenticated(SpurguardError):
    """A call without a token, or with one the server's token file does not hold."""

    code = "UNAUTHENTICATED"


class Cancelled(SpurguardError):
    """A job stopped on request (CancelJob, a client gone, server shutdown); its state is kept."""

    code = "CANCELLED"


MAX_MESSAGE_CHARS = 1000


def first_line(text: str) -> str:
    """First non-empty line, capped: messages are for people, not for dumping state."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


def exception_line(error: BaseException) -> str:
    """A third-party exception inside one of ours: its type and the first line of its message."""
    line = first_line(str(error))
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def error_status(error: BaseException, where: str) -> ErrorStatus:
    """What a client sees of `error`: a typed error keeps its code and message; anything else is
    INTERNAL with a short message, its traceback logged (`where`: the RPC or job) but never sent.

    The one mapping from exceptions to statuses: every RPC, per-image error and job error uses it.
    """
    if isinstance(error, SpurguardError):
        return ErrorStatus(error.code, first_line(str(error)) or error.code.lower())
    log.error("%s: unexpected %s", where, type(error).__name__, exc_info=error)
    return ErrorStatus("INTERNAL", f"internal error in {where} ({type(error).__name__}); see the server log")


def in_context(error: BaseException, where: str, context: str) -> SpurguardError:
    """`error` with `context` before its message and its status code kept, for a call that fails
    as a whole because of one part (one image of a ModelInfer batch: OIP has no per-item errors)."""
    status = error_status(error, where)
    typed = SpurguardError(f"{context}: {status.message}")
    typed.code = status.code
    return typed
