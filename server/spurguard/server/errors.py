"""Typed errors of the server side, each carrying the gRPC status code it maps to.

The engine, backends and store raise these and never import grpc; the rpc layer maps
`error.code` (a `grpc.StatusCode` member name) to the status in one place.
"""
from __future__ import annotations


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
    """A path outside the server's allowed data roots."""

    code = "PERMISSION_DENIED"


class Cancelled(SpurguardError):
    """A job stopped on request (CancelJob, a client gone, server shutdown); its state is kept."""

    code = "CANCELLED"
