"""The built-in demo_robust (issue 13): the demo CNN adversarially trained by the shipped script,
recorded beside its weights, and what it is for: from gray, the feature attack of the component
that the ground truth labels for each planted feature draws that feature, measured by the
energy concentration ratio of spurguard.server.demo.planted (1 = spread uniformly)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from spurguard.server.backends import TorchBackend, load_model
from spurguard.server.backends.modeldir import read_model_toml
from spurguard.server.demo import DEMO_MODEL_DIR, DEMO_ROBUST_MODEL_DIR, DemoDataset, load_ground_truth
from spurguard.server.demo.generator import GroundTruth
from spurguard.server.demo.planted import (
    PlantedLabel,
    concentration_ratio,
    engine_alphas,
    fit_planted_classes,
    label_planted_features,
)
from spurguard.server.demo.train import DEMO_PREPROCESS, NUM_COMPONENTS, REPORT
from spurguard.server.engine import ClassComponents
from spurguard.server.visualize import AttackResult, feature_attack

STEPS = 100  # half the default: enough at 64² for the ratios below, a second per attack here
# Thresholds from bench/run.py attack_readability (200 steps) and white noise: noise scores at
# most 1.11 (local) and 1.28 (stripes); this model's pixel attacks 1.6 (watermark), 2.3
# (flower) and 24 (stripes), the standard demo's 2.0, 1.5 and 2.6. The local ratio does not
# separate the two models (both tile the feature over the image; see the bench), the band does.
MIN_LOCAL_RATIO = 1.4
MIN_STRIPES_RATIO = 10.0


@pytest.fixture(scope="module")
def robust() -> TorchBackend:
    model = load_model("demo_robust", device="cpu")
    assert isinstance(model, TorchBackend)
    return model


@pytest.fixture(scope="module")
def truth(demo_data: DemoDataset) -> GroundTruth:
    return load_ground_truth(demo_data.root)


@pytest.fixture(scope="module")
def components(robust: TorchBackend, demo_data: DemoDataset, truth: GroundTruth) -> dict[int, ClassComponents]:
    return fit_planted_classes(robust, demo_data.root, truth, NUM_COMPONENTS)


@pytest.fixture(scope="module")
def labels(
    robust: TorchBackend, demo_data: DemoDataset, truth: GroundTruth, components: dict[int, ClassComponents]
) -> dict[str, PlantedLabel]:
    found = label_planted_features(truth, engine_alphas(robust, demo_data.root, components))
    return {label.feature: label for label in found}


def test_shipped_as_a_builtin_with_how_it_was_made(robust: TorchBackend, demo_report: dict[str, Any]) -> None:
    report = json.loads((DEMO_ROBUST_MODEL_DIR / REPORT).read_text(encoding="utf-8"))
    assert (robust.name, report["name"]) == ("demo_robust", "demo_robust")
    assert report["eps"] > 0 and report["attack_steps"] >= 1 and isinstance(report["seed"], int)
    assert report["generator"] == demo_report["generator"]  # the standard demo's data
    assert read_model_toml(DEMO_ROBUST_MODEL_DIR).preprocess == DEMO_PREPROCESS
    assert robust.digest != load_model("demo", device="cpu").digest
    assert sum(p.stat().st_size for p in DEMO_ROBUST_MODEL_DIR.iterdir()) < 2 * 2**20
    assert {p.name for p in DEMO_ROBUST_MODEL_DIR.iterdir()} == {p.name for p in DEMO_MODEL_DIR.iterdir()}


def test_ground_truth_labels_one_clear_component_per_feature(labels: dict[str, PlantedLabel], truth: GroundTruth) -> None:
    """Feature-only images against clean ones of the class: the component is unambiguous."""
    assert set(labels) == {f.name for f in truth.features}
    for label in labels.values():
        assert label.accepted and label.auc >= 0.95, label


@pytest.mark.parametrize("name", ["watermark", "stripes", "flower"])
def test_the_attack_from_gray_draws_the_feature(
    robust: TorchBackend,
    components: dict[int, ClassComponents],
    labels: dict[str, PlantedLabel],
    demo_data: DemoDataset,
    truth: GroundTruth,
    name: str,
) -> None:
    label = labels[name]
    feature = next(f for f in truth.features if f.name == name)
    *_, result = feature_attack(robust, components[label.class_index], [label.component], steps=STEPS, frame_every=0)
    assert isinstance(result, AttackResult) and result.parameterization == "pixel"
    ratio = float(concentration_ratio(result.pixels, demo_data.root, truth, feature)[0])
    print(f"{name}: component {label.component} (AUC {label.auc:.3f}), alpha {result.start_alphas[0]:.1f} -> "
          f"{result.final_alphas[0]:.1f}, concentration ratio {ratio:.2f}")
    assert result.final_alphas[0] > result.start_alphas[0]
    assert ratio >= (MIN_STRIPES_RATIO if feature.kind == "background_pattern" else MIN_LOCAL_RATIO)
