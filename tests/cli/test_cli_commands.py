"""The other commands against a fake client, and how failures are printed and exited."""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

import cli_fakes as f
from cli_fakes import FakeClient, Interrupt, RunCli
from spurguard.client import SpurguardClientError, cli


def test_models_table_and_json(cli_run: RunCli) -> None:
    fake = FakeClient(list_models=[f.model()], get_model=f.model(classes=True))
    human = cli_run(fake, "models")
    assert human.code == cli.EXIT_OK and human.out.splitlines()[1].split()[0] == "tiny"
    doc = json.loads(cli_run(fake, "models", "--json").out)
    assert [m["name"] for m in doc] == ["tiny"] and doc[0]["fitted_classes"] == [0, 1, 2, 5]


def test_components_passes_top_and_prints_the_spec_document(cli_run: RunCli) -> None:
    fake = FakeClient(get_components=f.components())
    outcome = cli_run(fake, "components", "--model", "tiny", "--class", "3", "--top", "2", "--json")
    assert fake.called("get_components") == [(("tiny", 3), {"top": 2})]
    doc = json.loads(outcome.out)
    assert (doc["model"], doc["class"], doc["images"], len(doc["components"])) == ("tiny", 3, 40, 2)


def test_label_sends_the_verdict_and_note(cli_run: RunCli) -> None:
    fake = FakeClient()
    outcome = cli_run(fake, "label", "--model", "tiny", "--class", "3", "--component", "1", "--as", "spurious",
                      "--note", "watermark")
    assert fake.called("label") == [(("tiny", 3, 1, "spurious"), {"note": "watermark"})]
    assert outcome.out == "model tiny  class 3  component 1: spurious  (fit fit-1)  note: watermark\n"


def test_jobs_and_cancel(cli_run: RunCli) -> None:
    fake = FakeClient(list_jobs=[f.job()], cancel_job=f.job(state="cancelled"))
    assert json.loads(cli_run(fake, "jobs", "--model", "tiny", "--json").out)[0]["job_id"] == "job-1"
    assert fake.called("list_jobs") == [(("tiny",), {})]
    outcome = cli_run(fake, "cancel", "job-1")
    assert fake.called("cancel_job") == [(("job-1",), {})]
    assert outcome.out.splitlines()[1].split()[:3] == ["job-1", "tiny", "cancelled"]


def test_visualize_writes_the_pngs_and_summarises_them(cli_run: RunCli, tmp_path: Path) -> None:
    fake = FakeClient(visualize=f.visualize_updates(component=2))
    out = tmp_path / "vis"
    outcome = cli_run(fake, "visualize", "--model", "tiny", "--class", "3", "--component", "2", "--out", str(out),
                      "--steps", "20", "--eps", "1.5", "--heatmap", "grad_cam", "--heatmap-layer", "layer4",
                      "--parameterization", "low_frequency", "--json")
    assert outcome.code == cli.EXIT_OK
    assert fake.called("visualize") == [(("tiny", 3, [2]), {"steps": 20, "eps": 1.5, "frame_every": None,
                                                              "top_k": None, "seed": None, "heatmap": "grad_cam",
                                                              "heatmap_layer": "layer4",
                                                              "parameterization": "low_frequency"})]
    folder = out / "class_3" / "component_2"
    assert sorted(p.name for p in folder.iterdir()) == [
        "attack.png", "frame_0000.png", "frame_0010.png", "heatmap_00.png", "heatmap_01.png", "top_00.png", "top_01.png"]
    assert (folder / "heatmap_01.png").read_bytes() == b"heat1"
    doc = json.loads(outcome.out)
    assert (doc["model"], doc["class"]) == ("tiny", 3)
    (component,) = doc["components"]
    assert {"index", "start_alpha", "final_alpha", "final_prob", "attack_image", "top_images"} <= set(component)
    assert (component["index"], component["start_alpha"], component["final_alpha"], component["final_prob"]) == (
        2, 0.5, 7.0, 0.7)
    assert component["attack_image"] == str(folder / "attack.png")
    assert component["parameterization"] == "pixel"  # what the (fake) server says it ran
    assert component["top_images"] == [
        {"image": "/data/train/3/a.png", "image_id": "3/a.png", "alpha": 5.0, "heatmap": str(folder / "heatmap_00.png"),
         "heatmap_method": "grad_cam", "png": str(folder / "top_00.png")},
        {"image": "/data/train/3/b.png", "image_id": "3/b.png", "alpha": 4.0, "heatmap": str(folder / "heatmap_01.png"),
         "heatmap_method": "grad_cam", "png": str(folder / "top_01.png")},
    ]
    assert [frame["step"] for frame in component["frames"]] == [0, 10]


def test_visualize_human_summary(cli_run: RunCli, tmp_path: Path) -> None:
    fake = FakeClient(visualize=f.visualize_updates(component=2) + f.visualize_updates(component=5))
    outcome = cli_run(fake, "visualize", "--model", "tiny", "--class", "3", "--component", "2,5", "--out", str(tmp_path))
    lines = outcome.out.splitlines()
    assert lines[0] == "model tiny  class 3"
    assert [line.split()[:4] for line in lines[2:]] == [["2", "0.5", "7", "0.700"], ["5", "0.5", "7", "0.700"]]
    assert fake.called("visualize")[0][0][2] == [2, 5]


def test_visualize_unimplemented_is_a_clean_error(cli_run: RunCli, tmp_path: Path) -> None:
    fake = FakeClient(visualize=[SpurguardClientError(grpc.StatusCode.UNIMPLEMENTED, "Visualize is not implemented yet")])
    outcome = cli_run(fake, "visualize", "--model", "tiny", "--class", "3", "--component", "0", "--out", str(tmp_path))
    assert outcome.code == cli.EXIT_ERROR
    assert outcome.err == "spurguard: error: UNIMPLEMENTED: Visualize is not implemented yet\n"


def test_evaluate_passes_options_and_prints_both_tables(cli_run: RunCli) -> None:
    updates = [f.t.EvaluateProgress("clean", 10, 32, 1.0), f.evaluate_result()]
    fake = FakeClient(evaluate=updates)
    outcome = cli_run(fake, "evaluate", "--model", "tiny", "--clean", "/c", "--spurious", "/s", "--spufix", "floor",
                      "--classes", "3,7", "--json")
    assert fake.called("evaluate") == [(("tiny", "/c", "/s"),
                                        {"spufix": "floor", "classes": [3, 7], "batch_size": None, "directions": None})]
    doc = json.loads(outcome.out)
    assert doc["mean_auc"] == 0.625 and doc["spufix"]["mean_auc"] == 0.875
    assert (doc["clean_images"], doc["spurious_images"], doc["skipped_images"]) == (20, 12, 1)
    human = cli_run(FakeClient(evaluate=updates), "evaluate", "--model", "tiny", "--clean", "/c", "--spurious", "/s")
    assert "0.625 → 0.875" in human.out and "20 clean, 12 spurious images, 1 unreadable left out" in human.out
    assert human.out.rstrip().endswith("kept in the server's store as evaluation ev-1")
    assert human.err.startswith("evaluate [") and "10/32 images" in human.err


def test_evaluate_without_result_is_an_error(cli_run: RunCli) -> None:
    outcome = cli_run(FakeClient(evaluate=[]), "evaluate", "--model", "tiny", "--clean", "/c", "--spurious", "/s")
    assert outcome.code == cli.EXIT_ERROR
    assert outcome.err == "spurguard: error: the server ended the evaluate stream without a result\n"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (SpurguardClientError(grpc.StatusCode.NOT_FOUND, "no model 'x'"), "spurguard: error: NOT_FOUND: no model 'x'\n"),
        (SpurguardClientError(grpc.StatusCode.INTERNAL, "two\nlines"), "spurguard: error: INTERNAL: two lines\n"),
        (f.unavailable(), "spurguard: error: UNAVAILABLE: failed to connect to all addresses (server h:1)\n"),
    ],
)
def test_server_errors_print_one_line_and_exit_1(cli_run: RunCli, error: SpurguardClientError, expected: str) -> None:
    fake = FakeClient()
    fake.error = error
    outcome = cli_run(fake, "--server", "h:1", "models")
    assert (outcome.code, outcome.out, outcome.err) == (cli.EXIT_ERROR, "", expected)
    assert fake.closed


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (SpurguardClientError(grpc.StatusCode.NOT_FOUND, "no model 'x'"), "NOT_FOUND", "no model 'x'"),
        (f.unavailable(), "UNAVAILABLE", "failed to connect to all addresses (server h:1)"),
    ],
)
def test_with_json_a_server_error_is_also_a_document_on_stdout(
    cli_run: RunCli, error: SpurguardClientError, code: str, message: str
) -> None:
    fake = FakeClient()
    fake.error = error
    outcome = cli_run(fake, "--server", "h:1", "models", "--json")
    assert outcome.code == cli.EXIT_ERROR
    assert json.loads(outcome.out) == {"error": {"code": code, "message": message}}
    assert outcome.err == f"spurguard: error: {code}: {message}\n"


def test_with_json_a_client_side_failure_is_also_a_document_on_stdout(cli_run: RunCli, tmp_path: Path) -> None:
    outcome = cli_run(FakeClient(evaluate=[]), "evaluate", "--model", "m", "--clean", "c", "--spurious", "s", "--json")
    message = "the server ended the evaluate stream without a result"
    assert (outcome.code, outcome.err) == (cli.EXIT_ERROR, f"spurguard: error: {message}\n")
    assert json.loads(outcome.out) == {"error": {"code": "INTERNAL", "message": message}}
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    outcome = cli_run(FakeClient(visualize=f.visualize_updates()), "visualize", "--model", "m", "--class", "3",
                      "--component", "2", "--out", str(blocker), "--json")
    assert outcome.code == cli.EXIT_ERROR
    error = json.loads(outcome.out)["error"]
    assert error["code"] == "UNKNOWN" and str(blocker) in error["message"]  # an OSError that is no NOT_FOUND
    outcome = cli_run(FakeClient(get_model=f.model(fitted=())), "report", "--model", "tiny", "--out", str(tmp_path),
                      "--json")
    assert json.loads(outcome.out)["error"]["code"] == "FAILED_PRECONDITION"


def test_ctrl_c_elsewhere_exits_130(cli_run: RunCli) -> None:
    outcome = cli_run(FakeClient(evaluate=[Interrupt()]), "evaluate", "--model", "m", "--clean", "c", "--spurious", "s")
    assert (outcome.code, outcome.err) == (cli.EXIT_INTERRUPTED, "spurguard: interrupted\n")


def test_an_unwritable_out_dir_is_a_local_error(cli_run: RunCli, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fake = FakeClient(visualize=f.visualize_updates())
    outcome = cli_run(fake, "visualize", "--model", "m", "--class", "3", "--component", "2", "--out", str(blocker))
    assert outcome.code == cli.EXIT_ERROR
    assert outcome.err.startswith("spurguard: error: [Errno") and "Traceback" not in outcome.err
