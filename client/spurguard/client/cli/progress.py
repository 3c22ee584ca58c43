"""Progress on stderr for the long CLI commands (fit, watch, evaluate, visualize, score).

A terminal gets one line redrawn in place with `\\r`; a log file or pipe gets a plain line now
and then (and on every phase change) instead of thousands of carriage returns. Own code rather
than tqdm, because the thin client must not depend on it.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

from spurguard import vocab as t

BAR_WIDTH = 20


def duration(seconds: float) -> str:
    """Elapsed time as m:ss, or h:mm:ss from an hour on."""
    minutes, secs = divmod(int(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#####-----]`; all dashes while the total is unknown (0)."""
    filled = min(width, width * done // total) if total > 0 else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _rate(done: int, elapsed_s: float) -> str:
    return f"{done / elapsed_s:.1f} img/s" if elapsed_s > 0 else "- img/s"


def fit_line(progress: t.FitProgress) -> str:
    """One fit job's progress: bar, images and classes done, elapsed, rate, phase."""
    p = progress
    return (
        f"fit {bar(p.images_done, p.images_total)} {p.images_done}/{p.images_total} images  "
        f"{p.classes_done}/{p.classes_total} classes  {duration(p.elapsed_s)}  {_rate(p.images_done, p.elapsed_s)}  "
        f"{p.phase}"
    )


def evaluate_line(progress: t.EvaluateProgress) -> str:
    p = progress
    return (
        f"evaluate {bar(p.images_done, p.images_total)} {p.images_done}/{p.images_total} images  "
        f"{duration(p.elapsed_s)}  {_rate(p.images_done, p.elapsed_s)}  {p.phase}"
    )


def score_line(done: int, total: int, elapsed_s: float) -> str:
    return f"score {bar(done, total)} {done}/{total} images  {duration(elapsed_s)}  {_rate(done, elapsed_s)}"


def visualize_line(update: t.VisualizeUpdate) -> str:
    """What just arrived from a Visualize stream."""
    head = f"visualize component {update.component}:"
    if isinstance(update, t.TopImage):
        return f"{head} top image {update.rank} alpha {update.alpha:.4g} ({update.image_id})"
    if isinstance(update, t.Heatmap):
        return f"{head} heatmap {update.rank} ({update.method})"
    if isinstance(update, t.AttackFrame):
        return f"{head} attack step {update.step} alpha {update.alpha:.4g} prob {update.prob:.3f}"
    return f"{head} attack done after {update.steps} steps, alpha {update.start_alpha:.4g} -> {update.final_alpha:.4g}"


class Progress:
    """A status line on `stream`: redrawn in place on a terminal, else a plain line per `interval_s`.

    `mode` is "tty", "plain" or "off". Terminal redraws are throttled to `redraw_s` and cut to
    `columns` - 1 characters (a wrapped line cannot be redrawn); a new `key` (the phase) is
    always shown, so short phases are not lost in the plain log.
    """

    def __init__(
        self,
        stream: TextIO,
        mode: str,
        *,
        interval_s: float = 10.0,
        redraw_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        columns: int | None = None,
    ) -> None:
        if mode not in ("tty", "plain", "off"):
            raise ValueError(f"progress mode must be tty, plain or off; got {mode!r}")
        self.stream = stream
        self.mode = mode
        self.interval_s = interval_s
        self.redraw_s = redraw_s
        self.clock = clock
        self.columns = shutil.get_terminal_size().columns if columns is None else columns
        self._last_time: float | None = None
        self._last_key: str | None = None
        self._width = 0  # length of the line on screen (tty), to blank what a shorter one leaves

    def update(self, text: str, key: str = "") -> None:
        """Show `text` if it is time to (or `key` changed)."""
        if self.mode == "off":
            return
        now = self.clock()
        wait = self.redraw_s if self.mode == "tty" else self.interval_s
        due = self._last_time is None or now - self._last_time >= wait or key != self._last_key
        if not due:
            return
        self._last_time, self._last_key = now, key
        if self.mode == "tty":
            text = text[: self.columns - 1]
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (e.g. "job started"), printed above the redrawn status line."""
        if self.mode == "off":
            return
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line so that what follows starts on a fresh one."""
        if self.mode == "tty" and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
