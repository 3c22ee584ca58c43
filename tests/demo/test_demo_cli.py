"""`spurguard demo --data-only DIR`: the planted dataset alone, for running the steps by hand."""
from __future__ import annotations

import os
import subprocess
import sys
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
    assert "--data-only DIR" in usage.stdout and "--seed" in usage.stdout
    done = subprocess.run([*run, "--data-only", str(tmp_path / "d"), *SMALL], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    assert str(tmp_path / "d" / "ground_truth.json") in done.stdout and (tmp_path / "d" / "train").is_dir()
