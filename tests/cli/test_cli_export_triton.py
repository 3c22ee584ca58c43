"""`spurguard export-triton` from the console script's entry point: forwarded to the server's
exporter, which writes the repository (tests/backends/test_backends_triton_repo.py checks its
contents) and reports on stdout, without connecting to any server."""
from __future__ import annotations

import json
from pathlib import Path

from cli_fakes import FakeClient, RunCli
from spurguard.client import cli


def test_export_triton_writes_the_demo_repository(cli_run: RunCli, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    outcome = cli_run(FakeClient(), "export-triton", "--model", "demo", "--out", str(repository), "--json",
                      "--platform", "pytorch_libtorch", "--max-batch-size", "8", "--instances", "2")
    assert (outcome.code, outcome.connects) == (cli.EXIT_OK, [])
    done = json.loads(outcome.out)
    assert (done["model"], done["platform"], done["max_batch_size"], done["instances"]) == (
        "demo_backbone", "pytorch_libtorch", 8, 2)
    assert sorted(p.name for p in (repository / "demo_backbone").rglob("*")) == ["1", "config.pbtxt", "model.pt"]

    outcome = cli_run(FakeClient(), "export-triton", "--model", "demo", "--out", str(repository))
    assert outcome.code == cli.EXIT_ERROR and outcome.out == ""
    assert outcome.err == f"spurguard export-triton: error: {repository / 'demo_backbone'} exists and is not empty; " \
                          "pass --force to replace it\n"


def test_export_triton_summary_and_usage_errors(cli_run: RunCli, tmp_path: Path) -> None:
    outcome = cli_run(FakeClient(), "export-triton", "--model", "demo", "--out", str(tmp_path / "repo"))
    assert outcome.code == cli.EXIT_OK
    assert outcome.out.startswith(f"wrote {tmp_path / 'repo' / 'demo_backbone'}: onnxruntime_onnx, max_batch_size 32")
    assert 'url = "127.0.0.1:8001"\n  model = "demo_backbone"\n' in outcome.out and "--model-dir" in outcome.out

    outcome = cli_run(FakeClient(), "export-triton", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r"))
    assert outcome.code == cli.EXIT_ERROR and "is neither a built-in model" in outcome.err
    outcome = cli_run(FakeClient(), "export-triton", "--model", "demo", "--out", "r", "--kind", "tpu")
    assert outcome.code == cli.EXIT_USAGE and "--kind: invalid choice: 'tpu'" in outcome.err
