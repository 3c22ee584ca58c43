"""`spurguard transfer` (SPEC §3): options, progress on stderr, the `--json` shape and the table;
and what the other commands show of a transfer: evaluate --transfer, score's sources, models."""
from __future__ import annotations

import dataclasses
import json

import cli_fakes as f
from cli_fakes import FakeClient, RunCli
from spurguard import vocab as t
from spurguard.client import cli


def test_transfer_resolves_classes_on_the_source_and_prints_the_spec_json(cli_run: RunCli) -> None:
    fake = FakeClient(transfer=[f.fit_progress("job-2", 20), f.transfer_summary()],
                      get_model=f.model("robust", classes=True))
    outcome = cli_run(fake, "transfer", "--from", "robust", "--to", "tiny", "--classes", "star,0", "--batch-size", "8",
                      "--json")
    assert outcome.code == cli.EXIT_OK
    assert fake.called("get_model") == [(("robust",), {})]  # class names are the source's
    assert fake.called("transfer") == [(("robust", "tiny"), {"classes": [3, 0], "batch_size": 8, "job_id": None})]
    doc = json.loads(outcome.out)
    assert {key: doc[key] for key in ("source_model", "source_fit", "target_model", "transfer_id")} == {
        "source_model": "robust", "source_fit": "fit-r", "target_model": "tiny", "transfer_id": "transfer-abc"}
    assert doc["classes"] == [{"class": 3, "images": 40, "directions": [
        {"source_component": 0, "covariance": 0.5, "alpha_floor": -0.25},
        {"source_component": 2, "covariance": 0.125, "alpha_floor": 0.0}]}]
    assert "20/40 images" not in outcome.out and outcome.err == ""  # --json: no plain progress lines


def test_transfer_table_and_plain_progress(cli_run: RunCli) -> None:
    outcome = cli_run(FakeClient(transfer=[f.fit_progress("job-2", 20), f.transfer_summary()]),
                      "transfer", "--from", "robust", "--to", "tiny")
    assert outcome.out.startswith("transfer transfer-abc from robust (fit fit-r, labels snap-1) to tiny (job job-2)")
    assert "now applied by tiny" in outcome.out and "SOURCE_COMPONENT" in outcome.out
    err = outcome.err.splitlines()
    assert err[0] == "following transfer job job-2 on 127.0.0.1:50051 (Ctrl-C stops watching; the job keeps running)"
    assert "20/40 images" in err[1]


def test_watch_of_a_transfer_job_prints_its_summary(cli_run: RunCli) -> None:
    outcome = cli_run(FakeClient(watch_job=[f.transfer_summary("job-9")]), "watch", "job-9", "--json")
    assert json.loads(outcome.out)["transfer_id"] == "transfer-abc"


def test_evaluate_transfer_asks_for_the_transferred_directions_and_lists_them(cli_run: RunCli) -> None:
    result = dataclasses.replace(f.evaluate_result(), directions="transferred", transfer_id="transfer-abc",
                                 spurious_directions=(t.SpuriousDirection(3, 0, "robust/fit-r/3/0"),))
    fake = FakeClient(evaluate=[result])
    outcome = cli_run(fake, "evaluate", "--model", "tiny", "--clean", "/c", "--spurious", "/s", "--transfer")
    assert fake.called("evaluate")[0][1]["directions"] == "transferred"
    assert "SpuFix removed (transferred): transferred (transfer-abc) robust/fit-r/3/0" in outcome.out
    doc = json.loads(cli_run(FakeClient(evaluate=[result]), "evaluate", "--model", "tiny", "--clean", "/c",
                             "--spurious", "/s", "--directions", "both", "--json").out)
    assert (doc["directions"], doc["transfer_id"]) == ("transferred", "transfer-abc")
    assert doc["spurious_directions"] == [{"class": 3, "component": 0, "source": "robust/fit-r/3/0"}]


def test_score_json_names_the_source_of_transferred_components_only() -> None:
    own, moved = t.ComponentAlpha(1, 0.25, "spurious"), t.ComponentAlpha(2, 1.5, "spurious", "robust/fit-r/3/2")
    result = dataclasses.replace(f.score_result("a.png"), components=(own, moved), transfer_id="transfer-abc")
    doc = result.to_dict()
    assert doc["components"] == [{"index": 1, "alpha": 0.25, "label": "spurious"},
                                 {"index": 2, "alpha": 1.5, "label": "spurious", "source": "robust/fit-r/3/2"}]
    assert doc["transfer_id"] == "transfer-abc"


def test_models_says_which_transfer_is_in_use_and_from_which_labels(cli_run: RunCli) -> None:
    info = dataclasses.replace(f.model(classes=True), transfer=f.transfer_info())
    outcome = cli_run(FakeClient(list_models=[info], get_model=info), "models")
    assert ("tiny applies transfer transfer-abc from robust (fit fit-r, spurious class/component 3/0, 3/2, "
            "made 2026-01-02 03:04)") in outcome.out


def test_the_report_names_the_transfer_and_says_when_the_source_labels_moved_on(tmp_path) -> None:  # noqa: ANN001
    from spurguard.client.cli.report import ReportWriter

    info = dataclasses.replace(f.model(classes=True), transfer=f.transfer_info())
    same = [r for r in f.transfer_info().labels]
    fake = FakeClient(get_model=dataclasses.replace(f.model("robust"), fit_id="fit-r"), list_labels=same)
    note = ReportWriter(fake, info, tmp_path)._transfer_note()  # noqa: SLF001
    assert note.startswith("tiny applies transfer transfer-abc from robust") and "changed since" not in note
    fake.answers["list_labels"] = same[:1]  # component 2 of class 3 relabelled on the source
    note = ReportWriter(fake, info, tmp_path)._transfer_note()  # noqa: SLF001
    assert "spurious labels have changed since" in note and "spurguard transfer --from robust --to tiny" in note
