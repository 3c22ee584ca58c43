"""`make demo`'s job end to end: a real server process, fit, labels from ground truth, scoring
and evaluation over gRPC, with the science checked against the generator's ground truth."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    workdir = tmp_path_factory.mktemp("demo")
    summary = workdir / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "spurguard.server.demo", "--workdir", str(workdir), "--summary", str(summary)],
        capture_output=True, text=True, timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(summary.read_text())


def test_labeller_finds_each_planted_feature_among_the_top_10(demo_run: tuple[str, dict]) -> None:
    _, summary = demo_run
    assert len(summary["labels"]) >= 3
    for label in summary["labels"]:
        assert label["component"] < 10
        assert label["auc"] >= 0.9, label


def test_spufix_raises_the_spurious_score_without_hurting_accuracy(demo_run: tuple[str, dict]) -> None:
    stdout, summary = demo_run
    planted = {label["class"] for label in summary["labels"]}
    for mode, result in summary["evaluate"].items():
        base = {row["class"]: row["auc"] for row in result["classes"]}
        fixed = {row["class"]: row["auc"] for row in result["spufix"]["classes"]}
        gain = sum(fixed[k] - base[k] for k in planted) / len(planted)
        print(f"{mode}: mean spurious AUC gain over the planted classes {gain:+.3f}, clean accuracy "
              f"{result['clean_accuracy']:.3f} -> {result['spufix']['clean_accuracy']:.3f}")
        assert gain > 0, mode
        if mode == "floor":
            assert gain >= 0.05
        assert result["clean_accuracy"] - result["spufix"]["clean_accuracy"] <= 0.01
    assert "AUC paper" in stdout and "AUC floor" in stdout  # both modes side by side


def test_trigger_counts_are_reported_against_ground_truth(demo_run: tuple[str, dict]) -> None:
    """Ground truth: the image re-rendered without its feature is predicted otherwise. On the
    shipped demo model floor-mode SpuFix lowers p(k|x) (the AUC gain above) but rarely moves a
    top-1 away: the floor is the component's level on images with the class object, and on
    spurious-only images it sits lower, so SpuFix removes less than the feature adds. Few
    triggers fire (recall is low), and those that fire must be right."""
    stdout, summary = demo_run
    triggers = summary["triggers"]
    assert triggers["should_fire"] > 0  # the model is fooled by the planted features
    assert 0 < triggers["fired"] <= triggers["images"]
    assert triggers["precision"] >= 0.5
    assert triggers["feature_logit_effect"] > triggers["spufix_removed"] > 0
    assert "SpuFix predicts" in stdout and "precision" in stdout


def test_labels_transferred_from_the_robust_model_raise_the_spurious_score(demo_run: tuple[str, dict]) -> None:
    """The paper's pipeline on the demo: the robust model, labelled from ground truth, carries
    every planted feature; its labels transferred to the standard model (max_cov, floor SpuFix)
    raise that model's spurious score clearly (measured here: 0.71 -> 0.83, own labels 0.87) at
    no more than a point of clean accuracy."""
    output, summary = demo_run
    transfer = summary["transfer"]
    assert {label["feature"] for label in transfer["robust_labels"]} == {"watermark", "stripes", "flower"}
    auc, accuracy = transfer["mean_auc"], transfer["clean_accuracy"]
    assert auc["transferred"] >= auc["without"] + 0.05
    assert accuracy["without"] - accuracy["transferred"] <= 0.01
    assert "labels transferred from demo_robust" in output
