"""The shipped demo model: it loads as the built-in "demo", classifies the clean test set, relies
on every planted feature, and the method works on it (SPEC §4): neural PCA finds each feature
among its class's top components, and SpuFix, with those components labelled spurious, raises
the spurious score without costing clean accuracy."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spurguard.server.backends import TorchBackend, builtin_names, load_model_dir, read_model_toml
from spurguard.server.demo import CLASSES, DEMO_MODEL_DIR, DemoDataset, generate
from spurguard.server.demo.model import FEATURE_DIM, DemoCNN
from spurguard.server.demo.train import DEMO_PREPROCESS, NUM_COMPONENTS, REPORT, evaluate_demo_model, l2_pgd

# sha256 of the shipped files and preprocessing (model_digest): fits are stored per digest, so a
# retrained model must be a deliberate change here too.
DEMO_DIGEST = "302c2cc3deb6361e0119c1f37c4199f2494b1f92f32139f58437c44ee061bd13"
# On images that show a class's planted feature but not its object, a model that ignored the
# feature would pick class k about 1 time in 6 (never the right answer there); the shipped
# model picks it for more than half of them, so it relies on every feature.
MIN_RELIANCE = 0.5


@pytest.fixture(scope="module")
def evaluation(backend: TorchBackend, demo_data: DemoDataset) -> dict[str, Any]:
    return evaluate_demo_model(backend, demo_data.root)


def test_shipped_model_loads_as_builtin_demo(backend: TorchBackend) -> None:
    assert "demo" in builtin_names()
    assert (backend.name, backend.num_classes, backend.feature_dim, backend.input_size) == ("demo", 6, FEATURE_DIM, 64)
    assert backend.class_names == list(CLASSES)
    assert read_model_toml(DEMO_MODEL_DIR).preprocess == DEMO_PREPROCESS
    assert backend.digest == load_model_dir(DEMO_MODEL_DIR, device="cpu").digest == DEMO_DIGEST
    assert sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()) < 2 * 2**20
    phi = backend.features(torch.randn(4, 3, 64, 64))
    assert phi.shape == (4, FEATURE_DIM) and (phi >= 0).all()


def test_clean_accuracy_and_reliance(evaluation: dict[str, Any]) -> None:
    assert evaluation["clean_accuracy"] >= 0.95
    for feature in evaluation["features"]:
        assert feature["reliance"] > MIN_RELIANCE, feature["name"]


def test_neural_pca_finds_every_planted_feature(evaluation: dict[str, Any]) -> None:
    for feature in evaluation["features"]:
        assert len(feature["component_aucs"]) == NUM_COMPONENTS
        assert feature["best_auc"] == max(feature["component_aucs"]) >= 0.9, feature["name"]


def test_spufix_raises_the_spurious_score(evaluation: dict[str, Any]) -> None:
    scores = evaluation["spurious_score"]
    for mode in ("baseline", "paper", "floor"):
        rows = ", ".join(f"{CLASSES[c['class']]} {c['auc']:.3f}" for c in scores[mode]["classes"])
        extra = "" if mode == "baseline" else (
            f"; gain {scores[mode]['mean_auc_gain']:+.3f}, accuracy drop {scores[mode]['accuracy_drop']:.3f}")
        print(f"{mode:>8}: mean AUC {scores[mode]['mean_auc']:.3f} ({rows}){extra}")
    floor = scores["floor"]
    assert floor["mean_auc_gain"] >= 0.05
    assert floor["accuracy_drop"] <= 0.01 and scores["paper"]["accuracy_drop"] <= 0.01
    planted = sorted(f["class_index"] for f in evaluation["features"])
    assert [c["class"] for c in floor["classes"]] == planted


def test_recorded_report_matches_a_fresh_evaluation(evaluation: dict[str, Any], demo_report: dict[str, Any]) -> None:
    """train_report.json belongs to the shipped files: the same numbers come back from them."""
    assert demo_report["clean_accuracy"] == pytest.approx(evaluation["clean_accuracy"], abs=0.01)
    for recorded, fresh in zip(demo_report["features"], evaluation["features"], strict=True):
        assert recorded["best_component"] == fresh["best_component"]
        assert recorded["reliance"] == pytest.approx(fresh["reliance"], abs=0.02)
        assert recorded["component_aucs"] == pytest.approx(fresh["component_aucs"], abs=0.01)
    for mode in ("paper", "floor"):
        recorded, fresh = demo_report["spurious_score"][mode], evaluation["spurious_score"][mode]
        assert recorded["mean_auc_gain"] == pytest.approx(fresh["mean_auc_gain"], abs=0.01)


def test_backbone_and_head_split_the_cnn() -> None:
    model = DemoCNN(len(CLASSES)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        phi = model.backbone(x)
        assert phi.shape == (3, FEATURE_DIM) and (phi >= 0).all()
        torch.testing.assert_close(model(x), phi @ model.head.weight.T + model.head.bias)


def test_training_script_end_to_end(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", seed=3, train_per_class=10, test_per_class=2, spurious_per_feature=2)
    out = tmp_path / "model"
    command = [sys.executable, "-m", "spurguard.server.demo.train", "--data", str(data.root), "--out", str(out),
               "--epochs", "1", "--seed", "5"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model = load_model_dir(out, device="cpu")
    assert (model.name, model.num_classes, model.feature_dim, model.class_names) == ("demo", 6, FEATURE_DIM, list(CLASSES))
    report = json.loads((out / REPORT).read_text())
    assert (report["seed"], report["epochs"], report["generator"]["seed"]) == (5, 1, 3)
    assert len(report["epoch_losses"]) == 1 and 0 <= report["clean_accuracy"] <= 1
    assert [f["name"] for f in report["features"]] == [f.name for f in data.features]
    assert set(report["spurious_score"]) == {"baseline", "paper", "floor"}


def test_l2_pgd_raises_the_loss_within_the_ball_and_the_box() -> None:
    """Adversarial training's inner attack, in [0, 1] pixel units like Visualize's eps."""
    torch.manual_seed(0)
    model = DemoCNN(len(CLASSES)).eval()
    std, mean = torch.tensor(DEMO_PREPROCESS.std).view(1, 3, 1, 1), torch.tensor(DEMO_PREPROCESS.mean).view(1, 3, 1, 1)
    pixels = torch.rand(4, 3, 64, 64)
    pixels[0] = 1.0  # a saturated image: the box binds
    x, y = (pixels - mean) / std, torch.tensor([0, 1, 2, 3])
    attacked = l2_pgd(model, x, y, 1.0, 3, DEMO_PREPROCESS)
    moved = attacked * std + mean
    assert float((moved - pixels).flatten(1).norm(dim=1).max()) <= 1.0 + 1e-5
    assert float(moved.min()) >= -1e-6 and float(moved.max()) <= 1 + 1e-6
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(model(attacked), y)) > float(loss(model(x), y))


def test_adversarial_training_end_to_end(tmp_path: Path) -> None:
    """--eps trains on L2 PGD attacks and records how (what the built-in demo_robust ships with)."""
    data = generate(tmp_path / "data", seed=3, train_per_class=10, test_per_class=2, spurious_per_feature=2)
    out = tmp_path / "robust"
    command = [sys.executable, "-m", "spurguard.server.demo.train", "--data", str(data.root), "--out", str(out),
               "--epochs", "1", "--eps", "0.5", "--attack-steps", "2", "--threads", "1", "--name", "demo_robust"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_model_dir(out, device="cpu").name == "demo_robust"
    report = json.loads((out / REPORT).read_text())
    assert (report["name"], report["eps"], report["attack_steps"], report["threads"]) == ("demo_robust", 0.5, 2, 1)
    bad = subprocess.run([*command[:-8], "--eps", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--eps must be >= 0" in bad.stderr
