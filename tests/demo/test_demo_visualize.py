"""What the labeller sees on the demo model (SPEC §1 "Visualising a component", §4): for each
planted feature, the matching component's feature attack climbs far above the gray start, and
its heatmap, made the way Visualize makes it, puts most of its mass on the feature itself
(measured with the generator's masks)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from spurguard.server.backends import TorchBackend
from spurguard.server.datasets import ClassResolver, list_image_folder
from spurguard.server.demo import DemoDataset
from spurguard.server.demo.generator import GroundTruth, load_ground_truth
from spurguard.server.demo.train import NUM_COMPONENTS, backend_features
from spurguard.server.engine import ClassComponents, fit_alphas, fit_components
from spurguard.server.visualize import AttackResult, component_heatmaps, feature_attack
from spurguard.server.visualize.heatmap import default_gradcam_layer

# "Most of the heatmap mass" on the feature, taken literally. The watermark and the flower cover
# about 5% of an image, so a map blind to them puts about 5% of its mass there; the stripes
# cover nearly all of a spurious-test image, so for them the bar is the literal one alone.
MIN_MASS_ON_FEATURE = 0.5
MIN_ENRICHMENT_OF_SMALL_FEATURES = 5.0  # mass share / area share, for features under 25% of the image


@pytest.fixture(scope="module")
def truth(demo_data: DemoDataset) -> GroundTruth:
    return load_ground_truth(demo_data.root)


@pytest.fixture(scope="module")
def components(backend: TorchBackend, demo_data: DemoDataset, truth: GroundTruth) -> dict[int, ClassComponents]:
    """Neural PCA of the planted classes on the training set, with every fit image's alphas."""
    train = list_image_folder(demo_data.root / "train", ClassResolver(truth.classes))
    phi = backend_features(backend, train)
    labels = torch.tensor([e.class_index for e in train])
    weight, _ = backend.head()
    fitted = fit_components(weight, phi, labels, NUM_COMPONENTS)
    planted = {feature.class_index for feature in truth.features}
    for k in planted:
        fitted[k].alphas = fit_alphas(fitted[k], weight[k], phi[labels == k])
    return {k: fitted[k] for k in planted}


def _feature(demo_report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in demo_report["features"] if f["name"] == name)


@pytest.mark.parametrize("name", ["watermark", "stripes", "flower"])
def test_the_attack_shows_more_of_the_feature_than_any_training_image(
    backend: TorchBackend, components: dict[int, ClassComponents], demo_report: dict[str, Any], name: str
) -> None:
    """The paper's attack (gray start, eps 30 at 224² scaled to 64², 200 steps) must end at
    least twice as high as the highest fit image: a picture of the component far stronger than
    any real example, so that a human sees what it responds to."""
    feature = _feature(demo_report, name)
    comp = components[feature["class_index"]]
    best = feature["best_component"]
    *_, result = feature_attack(backend, comp, [best], frame_every=0)
    assert isinstance(result, AttackResult)
    start, final = float(result.start_alphas[0]), float(result.final_alphas[0])
    fit_max = float(comp.alphas[:, best].max())
    print(f"{name}: alpha {start:.1f} at gray -> {final:.1f}; largest on a training image {fit_max:.1f}")
    assert fit_max > start and final >= 2 * fit_max


def _spurious_images(root: Path, truth: GroundTruth, name: str) -> tuple[list[Path], np.ndarray]:
    """The feature's spurious-test images (the feature without its class's object) and, per
    image, the feature's mask [N, S, S]."""
    folder = next(f.spurious_folder for f in truth.features if f.name == name)
    paths, masks = [], []
    for image_id, image in sorted(truth.images.items()):
        if not image_id.startswith(folder + "/"):
            continue
        (instance,) = [f for f in image.features if f.name == name]
        paths.append(root / image_id)
        masks.append(np.asarray(Image.open(root / instance.mask)) > 0)
    return paths, np.stack(masks)


@pytest.mark.parametrize("name", ["watermark", "stripes", "flower"])
def test_heatmaps_put_most_of_their_mass_on_the_planted_feature(
    backend: TorchBackend,
    components: dict[int, ClassComponents],
    demo_data: DemoDataset,
    truth: GroundTruth,
    demo_report: dict[str, Any],
    name: str,
) -> None:
    """On the images that carry the feature and nothing of its class, the component's heatmap
    (the server's default method for this model) must sit on the feature."""
    feature = _feature(demo_report, name)
    paths, masks = _spurious_images(demo_data.root, truth, name)
    inputs = backend.preprocess([p.read_bytes() for p in paths])
    heatmaps = component_heatmaps(
        backend, components[feature["class_index"]], feature["best_component"], inputs,
        layer=default_gradcam_layer(backend),
    )
    assert heatmaps.method == "integrated_gradients"  # torch.export backbone: nothing to hook
    totals = heatmaps.maps.sum(axis=(1, 2))
    assert (totals > 0).all()
    mass = float(((heatmaps.maps * masks).sum(axis=(1, 2)) / totals).mean())
    area = float(masks.mean())
    print(f"{name}: {mass:.2f} of the heatmap mass on the feature, which covers {area:.2f} of the image")
    assert mass >= MIN_MASS_ON_FEATURE
    if area < 0.25:
        assert mass / area >= MIN_ENRICHMENT_OF_SMALL_FEATURES
