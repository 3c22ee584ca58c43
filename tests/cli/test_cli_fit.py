"""`spurguard fit` / `watch`: progress, summary, --detach, and Ctrl-C leaving (or cancelling) the job."""
from __future__ import annotations

import json
import sys

import grpc
import pytest

import cli_fakes as f
from cli_fakes import FakeClient, Interrupt, RunCli
from spurguard.client import SpurguardClientError, cli

FIT = ("fit", "--model", "tiny", "--data", "/data/train")


def stream(*extra: object) -> list[object]:
    return [f.fit_progress(done=0, phase="scanning"), f.fit_progress(done=20), *extra]


def test_fit_passes_every_option_and_prints_the_summary(cli_run: RunCli) -> None:
    fake = FakeClient(fit=stream(f.fit_summary()))
    outcome = cli_run(
        fake, *FIT, "--classes", "0,1", "--components", "2", "--batch-size", "8", "--job-id", "job-1", "--extend"
    )
    assert outcome.code == cli.EXIT_OK
    assert fake.called("fit") == [
        (("tiny", "/data/train"),
         {"classes": [0, 1], "num_components": 2, "batch_size": 8, "job_id": "job-1", "extend": True})
    ]
    assert outcome.out.startswith("fit fit-1 committed for model tiny (job job-1)")
    err = outcome.err.splitlines()  # stderr is not a terminal: plain lines, one per phase here
    assert err[0] == "following fit job job-1 on 127.0.0.1:50051 (Ctrl-C stops watching; the job keeps running)"
    assert err[1].endswith("scanning") and "0/40 images" in err[1]
    assert err[2].endswith("features") and "20/40 images" in err[2]


def test_fit_json_is_one_document_without_plain_progress(cli_run: RunCli) -> None:
    outcome = cli_run(FakeClient(fit=stream(f.fit_summary())), "--json", *FIT)
    assert json.loads(outcome.out)["fit_id"] == "fit-1"
    assert outcome.err == ""


def test_a_terminal_gets_a_redrawn_bar(cli_run: RunCli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # the line is cut to the terminal's width
    outcome = cli_run(FakeClient(fit=stream(f.fit_summary())), "--json", *FIT)
    assert "\rfit [" in outcome.err and "scanning" in outcome.err
    assert json.loads(outcome.out)["job_id"] == "job-1"


def test_a_stream_without_summary_is_an_error(cli_run: RunCli) -> None:
    outcome = cli_run(FakeClient(fit=stream()), *FIT)
    assert outcome.code == cli.EXIT_ERROR
    assert outcome.err.endswith("spurguard: error: the server ended fit job job-1's stream without a summary\n")


def test_a_failed_job_reports_its_status(cli_run: RunCli) -> None:
    failure = SpurguardClientError(grpc.StatusCode.PERMISSION_DENIED, "dataset '/etc' is outside the data roots")
    outcome = cli_run(FakeClient(fit=stream(failure)), *FIT)
    assert outcome.code == cli.EXIT_ERROR
    assert outcome.err.endswith("spurguard: error: PERMISSION_DENIED: dataset '/etc' is outside the data roots\n")
    assert "Traceback" not in outcome.err


def test_ctrl_c_leaves_the_job_running_and_says_how_to_follow_or_cancel(cli_run: RunCli) -> None:
    fake = FakeClient(fit=stream(Interrupt()))
    outcome = cli_run(fake, "--server", "h:9", *FIT)
    assert outcome.code == cli.EXIT_INTERRUPTED
    assert fake.called("cancel_job") == []
    last = outcome.err.splitlines()[-1]
    assert "fit job job-1 continues on the server" in last
    assert "`spurguard --server h:9 watch job-1`" in last and "`spurguard --server h:9 cancel job-1`" in last


def test_ctrl_c_with_cancel_on_interrupt_cancels(cli_run: RunCli) -> None:
    fake = FakeClient(fit=stream(Interrupt()), cancel_job=f.job(state="cancelled"))
    outcome = cli_run(fake, *FIT, "--cancel-on-interrupt")
    assert outcome.code == cli.EXIT_INTERRUPTED
    assert fake.called("cancel_job") == [(("job-1",), {})]
    assert "cancel requested for fit job job-1 (state: cancelled)" in outcome.err


def test_ctrl_c_before_the_job_is_named(cli_run: RunCli) -> None:
    fake = FakeClient(fit=[Interrupt()])
    outcome = cli_run(fake, *FIT, "--cancel-on-interrupt")
    assert outcome.code == cli.EXIT_INTERRUPTED
    assert fake.called("cancel_job") == []
    assert "see `spurguard jobs`" in outcome.err


def test_detach_prints_the_job_after_the_first_update(cli_run: RunCli) -> None:
    fake = FakeClient(fit=stream(f.fit_summary()), get_job=f.job())
    outcome = cli_run(fake, *FIT, "--detach", "--json")
    assert outcome.code == cli.EXIT_OK
    assert json.loads(outcome.out)["state"] == "running"
    assert fake.called("get_job") == [(("job-1",), {})]
    human = cli_run(FakeClient(fit=stream(), get_job=f.job()), *FIT, "--detach")
    assert human.out == "fit job job-1: running; follow it with `spurguard watch job-1`\n"


def test_watch_follows_an_existing_job(cli_run: RunCli) -> None:
    fake = FakeClient(watch_job=[f.fit_summary("job-7")])
    outcome = cli_run(fake, "watch", "job-7", "--json")
    assert fake.called("watch_job") == [(("job-7",), {})]
    assert json.loads(outcome.out)["job_id"] == "job-7"
