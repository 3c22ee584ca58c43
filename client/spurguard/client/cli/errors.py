"""How a command ends: its exit status, and the two failures that are the client's own."""
from __future__ import annotations

import grpc

EXIT_OK = 0
EXIT_ERROR = 1  # a call failed: the server's status code is printed
EXIT_USAGE = 2  # bad arguments (argparse or the client's checks), or the server extra missing for serve/demo
EXIT_PARTIAL = 3  # score: some images failed, the others were printed
EXIT_INTERRUPTED = 130  # Ctrl-C


class CliError(Exception):
    """A failure on the client's side (not a server status): printed as one line, exit 1.

    `code` is the gRPC status that describes it best, for the --json error document.
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.code = code


class UsageError(Exception):
    """Arguments that argparse cannot check alone (e.g. an empty image folder): exit 2."""
