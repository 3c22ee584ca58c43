"""The one mapping from exceptions to what a client sees: a gRPC status code and one line.

Why one place: every RPC, every per-image error and every job error goes through here, so a
typed SpurguardError always arrives with its own code, and anything unexpected arrives as
INTERNAL with a short message while its traceback goes to the server log, never to the client.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from spurguard.server.errors import SpurguardError

log = logging.getLogger("spurguard.server")
MAX_MESSAGE_CHARS = 1000


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str

    @property
    def number(self) -> int:
        """The numeric code (google.rpc.Code), as ErrorStatus carries it."""
        return int(self.code.value[0])


def one_line(text: str) -> str:
    """First non-empty line, capped: messages are for people, not for dumping state."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


def status_of(error: BaseException, where: str) -> Status:
    """The status for `error`; `where` (an RPC or job name) goes into the log of unexpected ones."""
    if isinstance(error, SpurguardError):
        code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)
        return Status(code, one_line(str(error)) or code.name.lower())
    log.error("%s: unexpected %s", where, type(error).__name__, exc_info=error)
    return Status(grpc.StatusCode.INTERNAL, f"internal error in {where} ({type(error).__name__}); see the server log")
