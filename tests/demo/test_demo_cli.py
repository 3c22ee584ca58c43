"""`spurguard demo --data-only DIR`: the planted dataset alone, for running the steps by hand."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spurguard.server.demo import GeneratorConfig, dataset_paths, generate, load_ground_truth
from spurguard.server.demo import __main__ as demo

SMALL = ["--train-per-class", "3", "--test-per-class", "1", "--spurious-per-feature", "2"]


def test_data_only_writes_the_dataset_and_starts_no_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "ServerProcess", None)  # calling it would fail the test
    root = tmp_path / "data"
    assert demo.main(["--data-only", str(root), "--seed", "5", *SMALL]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote the planted-spurious dataset (seed 5) in ")
    assert [line.split() for line in out[1:]] == [[part, str(path)] for part, path in dataset_paths(root).items()]
    assert all(path.exists() for path in dataset_paths(root).values())
    assert load_ground_truth(root).config == GeneratorConfig(5, 3, 1, 2)
    same = generate(tmp_path / "again", 5, train_per_class=3, test_per_class=1, spurious_per_feature=2)
    assert (same.root / "ground_truth.json").read_bytes() == (root / "ground_truth.json").read_bytes()


def test_data_only_refuses_a_folder_with_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit) as caught:
        demo.main(["--data-only", str(tmp_path), *SMALL])
    assert caught.value.code == 2 and "is not empty" in capsys.readouterr().err


def test_python_m_with_help_and_data_only(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = [sys.executable, "-m", "spurguard.server.demo"]
    usage = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert all(flag in usage.stdout for flag in ("--data-only DIR", "--seed", "--keep-serving"))
    done = subprocess.run([*run, "--data-only", str(tmp_path / "d"), *SMALL], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    assert str(tmp_path / "d" / "ground_truth.json") in done.stdout and (tmp_path / "d" / "train").is_dir()


# ---- the end of the demo: how to keep the server, or serve until stopped (tests/e2e runs it for real) ----


class _Server:
    """What `finish` uses of a ServerProcess, around any child process."""

    def __init__(self, process: object) -> None:
        self.process, self.target = process, "127.0.0.1:50999"


class _AsksToStop:
    """A child that is still running and, when first looked at, has the demo sent `signum` (as
    Ctrl-C or a supervisor would), so that the signal surely arrives while the demo is waiting."""

    pid, returncode = 4242, None

    def __init__(self, signum: int) -> None:
        self.signum, self.polls = signum, 0

    def poll(self) -> int | None:
        self.polls += 1
        if self.polls == 1:
            os.kill(os.getpid(), self.signum)
        return None


def test_without_keep_serving_the_last_line_says_how_to_keep_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.finish(_Server(None), "tok", keep_serving=False) == 0  # type: ignore[arg-type]
    last = capsys.readouterr().out.splitlines()[-1]
    assert "make demo ARGS=--keep-serving" in last and "spurguard demo --keep-serving" in last and "tok" not in last


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_kept_serving_prints_the_ui_command_last_and_stops_on_ctrl_c_or_sigterm(
    signum: int, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert demo.finish(_Server(_AsksToStop(signum)), "tok-123", keep_serving=True) == 0  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert "127.0.0.1:50999 (pid 4242)" in lines[-3] and demo.UI_URL in lines[-2]
    assert lines[-1] == "  spurguard ui --server 127.0.0.1:50999 --token tok-123" and out.count("tok-123") == 1
    assert f"{signal.Signals(signum).name}: stopping the demo server" in err
    assert {s: signal.getsignal(s) for s in before} == before  # the demo's handlers are gone again


def test_kept_serving_ends_with_1_when_the_server_ends_by_itself(capsys: pytest.CaptureFixture[str]) -> None:
    server = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], text=True)
    assert demo.finish(_Server(server), "tok", keep_serving=True) == 1  # type: ignore[arg-type]
    assert "the demo server ended by itself (exit code 3)" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stopped_mid_run_the_demo_stops_its_server_too(
    signum: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C or SIGTERM while the demo fits or scores: its server process must not outlive it."""
    stopped: list[bool] = []

    class Server:
        target = "127.0.0.1:50999"

        def __init__(self, args: object) -> None:
            pass

        def __enter__(self) -> Server:
            return self

        def __exit__(self, *exc_info: object) -> None:
            stopped.append(True)

    def interrupted_run(*args: object) -> dict[str, object]:
        os.kill(os.getpid(), signum)
        time.sleep(10)
        raise AssertionError("the signal did not interrupt the run")

    monkeypatch.setattr(demo, "_dataset", lambda workdir, config: (tmp_path / "data", None))
    monkeypatch.setattr(demo, "ServerProcess", Server)
    monkeypatch.setattr(demo, "run", interrupted_run)
    before = signal.getsignal(signal.SIGTERM)
    if signum == signal.SIGINT:
        assert demo.main(["--workdir", str(tmp_path)]) == 128 + signal.SIGINT  # said in words, no traceback
    else:
        with pytest.raises(SystemExit) as ended:
            demo.main(["--workdir", str(tmp_path)])
        assert ended.value.code == 128 + signal.SIGTERM
    assert stopped == [True]
    assert signal.getsignal(signal.SIGTERM) == before
