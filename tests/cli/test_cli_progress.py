"""Progress rendering: the line contents, in-place redraws on a terminal, throttled plain lines otherwise."""
from __future__ import annotations

import io

import pytest

import cli_fakes as f
from spurguard.client.cli import progress as p


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_duration_and_bar() -> None:
    assert [p.duration(s) for s in (0, 59.9, 61, 3600 + 62)] == ["0:00", "0:59", "1:01", "1:01:02"]
    assert p.bar(5, 10, width=10) == "[#####-----]"
    assert p.bar(3, 0, width=4) == "[----]"  # total unknown yet
    assert p.bar(12, 10, width=4) == "[####]"


def test_fit_line_shows_images_classes_elapsed_rate_and_phase() -> None:
    line = p.fit_line(f.fit_progress(done=10))
    assert line.startswith("fit [")
    for part in ("10/40 images", "1/4 classes", "0:02", "5.0 img/s", "features"):
        assert part in line, part
    assert "- img/s" in p.evaluate_line(f.t.EvaluateProgress("scanning", 0, 0, 0.0))
    assert "3/9 images" in p.score_line(3, 9, 1.5)


def test_terminal_redraws_in_place_and_blanks_leftovers() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = p.Progress(stream, "tty", redraw_s=0.1, clock=clock, columns=11)
    progress.update("long line", key="a")
    clock.now = 0.05
    progress.update("skipped", key="a")  # too soon
    clock.now = 0.2
    progress.update("short", key="a")
    progress.update("new phase", key="b")  # a new key is shown at once
    progress.update("too long for the terminal", key="c")
    progress.close()
    assert stream.getvalue() == "\rlong line\rshort    \rnew phase\rtoo long f\n"


def test_plain_mode_writes_a_line_per_interval_and_per_key() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = p.Progress(stream, "plain", interval_s=10, clock=clock)
    for now, text, key in [(0, "one", "a"), (5, "two", "a"), (6, "three", "b"), (16, "four", "b"), (17, "five", "b")]:
        clock.now = now
        progress.update(text, key=key)
    progress.message("note")
    progress.close()
    assert stream.getvalue() == "one\nthree\nfour\nnote\n"


def test_off_writes_nothing_and_bad_modes_are_refused() -> None:
    stream = io.StringIO()
    progress = p.Progress(stream, "off")
    progress.update("x")
    progress.message("y")
    progress.close()
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="progress mode"):
        p.Progress(stream, "fancy")


def test_message_ends_the_redrawn_line_first() -> None:
    stream = io.StringIO()
    progress = p.Progress(stream, "tty")
    progress.update("status")
    progress.message("job started")
    assert stream.getvalue() == "\rstatus\njob started\n"


def test_visualize_lines_name_the_component_and_step() -> None:
    lines = [p.visualize_line(update) for update in f.visualize_updates(component=2)]
    assert all(line.startswith("visualize component 2:") for line in lines)
    assert "top image 0 alpha 5 (3/a.png)" in lines[0]
    assert "heatmap 1 (grad_cam)" in lines[2]
    assert "attack step 10 alpha 6 prob 0.600" in lines[5]
    assert "after 20 steps, alpha 0.5 -> 7" in lines[6]
