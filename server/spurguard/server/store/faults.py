"""Crash points: where a kill -9 matters most, the fit path calls `crash_point`, so that a
crash test can kill the server exactly there, not only somewhere near.

A documented fault-injection hook, off unless asked for: with the environment variable
SPURGUARD_CRASH_AT set to a point's name, the process sends itself SIGKILL when it reaches that
point (a real kill -9: no cleanup, no flush, no exit handler). The points:

    batch:FIT_ID:N          after the N-th batch of a fit's features (1-based) is accumulated
    class:FIT_ID:K          after class K of the fit is persisted
    commit-manifest:FIT_ID  in commit, just before the manifest is written
    commit-current:FIT_ID   in commit, after the manifest, before current.json is switched
"""
from __future__ import annotations

import os
import signal

CRASH_ENV = "SPURGUARD_CRASH_AT"


def crash_point(*name: object) -> None:
    """SIGKILL this process if SPURGUARD_CRASH_AT names this point (its parts joined by ':')."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted and wanted == ":".join(map(str, name)):
        os.kill(os.getpid(), signal.SIGKILL)
