"""`spurguard fit --store DIR …`: forwarded to the in-process fit (no server, no client made);
without --store, `fit` stays the client command. The sharded fit's results are checked in
tests/serving/test_serving_sharding.py; here the command line around it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_fakes import FakeClient, RunCli
from spurguard.client import cli
from spurguard.server.demo import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    generate(root, 2, train_per_class=3, test_per_class=1, spurious_per_feature=1)
    return root / "train"


def test_help_of_both_fits_says_which_is_which(cli_run: RunCli, tmp_path: Path) -> None:
    online = cli_run(FakeClient(), "fit", "--help")
    assert online.code == cli.EXIT_OK and "With --store DIR the fit runs in this process" in " ".join(online.out.split())
    offline = cli_run(FakeClient(), "fit", "--store", str(tmp_path), "--help")
    text = " ".join(offline.out.split())
    assert offline.code == cli.EXIT_OK and offline.connects == []
    assert "Fit in this process, with no server" in text and "--shard I/N" in text and "$JOB_COMPLETION_INDEX" in text


def test_an_offline_fit_commits_to_the_store_without_a_server(cli_run: RunCli, tmp_path: Path, data: Path) -> None:
    outcome = cli_run(FakeClient(), "fit", "--json", f"--store={tmp_path}", "--model", "demo", "--data", str(data),
                      "--classes", "circle,1", "--components", "2", "--job-id", "local")
    assert (outcome.code, outcome.connects) == (cli.EXIT_OK, [])
    summary = json.loads(outcome.out)  # the same shape as a served fit's `fit --json`
    assert (summary["fit_id"], [c["class"] for c in summary["classes"]]) == ("local", [0, 1])
    assert "fit local: committing 6/6 images" in outcome.err
    assert (tmp_path / "models" / "demo").is_dir()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "demo", "--shard", "0/3", "--job-id", "j"], "--data is required (except with --merge)"),
        (["--model", "demo", "--data", "d", "--shard", "0/3"], "--job-id is required with --shard and --merge"),
        (["--model", "demo", "--data", "d", "--shard", "auto/3", "--job-id", "j"],
         "--shard auto/3 needs $JOB_COMPLETION_INDEX set to 0..2"),
        (["--model", "demo", "--data", "d", "--shard", "3/3", "--job-id", "j"], "need N >= 1 and 0 <= I < N"),
        (["--model", "demo", "--merge", "2", "--shard", "0/2", "--job-id", "j"], "not allowed with argument"),
        (["--model", "demo", "--data", "d", "--wait", "5"], "--wait goes with --merge"),
        (["--model", "demo", "--data", "d", "--extend"], "unrecognized arguments: --extend"),
    ],
)
def test_offline_usage_errors(cli_run: RunCli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, argv: list[str],
                              message: str) -> None:
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    outcome = cli_run(FakeClient(), "fit", "--store", str(tmp_path), *argv)
    assert outcome.code == cli.EXIT_USAGE and message in outcome.err, outcome.err


def test_connection_options_do_not_go_with_store(cli_run: RunCli, tmp_path: Path) -> None:
    outcome = cli_run(FakeClient(), "--server", "h:1", "--tls", "fit", "--store", str(tmp_path), "--model", "demo")
    assert outcome.code == cli.EXIT_USAGE and outcome.connects == []
    assert outcome.err == "spurguard fit: error: --server, --tls: a fit with --store runs here, with no server\n"


def test_a_merge_of_missing_shards_fails_naming_them(cli_run: RunCli, tmp_path: Path) -> None:
    outcome = cli_run(FakeClient(), "--json", "fit", "--store", str(tmp_path), "--model", "demo", "--job-id", "j",
                      "--merge", "2")
    assert outcome.code == cli.EXIT_ERROR and outcome.connects == []
    error = json.loads(outcome.out)["error"]
    assert error["code"] == "FAILED_PRECONDITION" and "shard(s) 0-of-2, 1-of-2 not written yet" in error["message"]
