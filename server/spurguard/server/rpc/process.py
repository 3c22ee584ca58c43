"""`spurguard serve` as a child process: what `make demo`, the benchmarks and tests start.

A real process (not a thread) so that clients talk to it over the wire exactly as production
traffic does; stopped by its pid with SIGTERM (the graceful path), never by name. No load
balancer routes to it, so it has no drain delay unless ARGS give one (`--drain-delay-s S`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

READY_PREFIX = "spurguard serving on "  # the line rpc.app prints once every model is warmed up


class ServerProcess:
    """Start `python -m spurguard.server.rpc.app ARGS` on 127.0.0.1 (a free port) and wait until ready."""

    def __init__(self, args: Sequence[str], *, stderr: int | None = None, env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "spurguard.server.rpc.app", "--host", "127.0.0.1", "--port", "0",
                   "--drain-delay-s", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        self.target = self._wait_ready()

    def _wait_ready(self) -> str:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(READY_PREFIX):
                return line[len(READY_PREFIX):].strip()
        raise RuntimeError(f"the server exited (code {self.process.wait()}) before it was ready")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the graceful drain (SIGKILL after `timeout`); the exit code."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
