"""Exceptions as gRPC statuses: `errors.error_status` decides code and message, this adds grpc's type."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from spurguard.server.errors import error_status


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str

    @property
    def number(self) -> int:
        """The numeric code (google.rpc.Code), as ErrorStatus carries it."""
        return int(self.code.value[0])


def status_of(error: BaseException, where: str) -> Status:
    """The status for `error`; `where` (an RPC or job name) goes into the log of unexpected ones."""
    status = error_status(error, where)
    return Status(getattr(grpc.StatusCode, status.code, grpc.StatusCode.INTERNAL), status.message)
