"""The demo's ground-truth helpers: which component carries a planted feature, and the energy
concentration ratio of an attack image on that feature (spurguard.server.demo.planted)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from spurguard.server.demo import generate, load_ground_truth
from spurguard.server.demo.generator import STRIPE_ANGLES, STRIPE_PERIODS, GroundTruth
from spurguard.server.demo.planted import (
    concentration_ratio,
    contrast_images,
    feature_crops,
    label_planted_features,
    local_concentration,
    spectral_concentration,
    stripe_band,
    template_match,
)

SIZE = 64


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GroundTruth]:
    root = tmp_path_factory.mktemp("planted") / "data"
    generate(root, seed=2, train_per_class=12, test_per_class=4, spurious_per_feature=6)
    return root, load_ground_truth(root)


def test_contrasts_pick_the_images_the_ground_truth_names(small: tuple[Path, GroundTruth]) -> None:
    _, truth = small
    for feature in truth.features:
        positives, negatives = contrast_images(truth, feature, "feature_only")
        assert len(positives) == 6 and all(i.startswith(feature.spurious_folder + "/") for i in positives)
        assert len(negatives) == 4
        assert all(truth.images[i].split == "clean_test" and truth.images[i].class_index == feature.class_index
                   for i in negatives)
        with_feature, without = contrast_images(truth, feature, "in_class")
        assert len(with_feature) + len(without) == 12 and with_feature and without
        assert all(truth.images[i].has(feature.name) for i in with_feature)
        assert not any(truth.images[i].has(feature.name) for i in without)
    with pytest.raises(ValueError, match="unknown contrast 'top_images'"):
        contrast_images(truth, truth.features[0], "top_images")  # type: ignore[arg-type]


@pytest.mark.parametrize("contrast", ["feature_only", "in_class"])
def test_the_component_that_separates_the_contrast_is_chosen(small: tuple[Path, GroundTruth], contrast: str) -> None:
    """Component 2 is high exactly on the positives, the others are noise. A class whose
    components are all flat (AUC 0.5) gets its best one, not accepted (AUC < MIN_AUC)."""
    _, truth = small
    rng = np.random.default_rng(0)
    noise_only = truth.features[1].class_index
    asked: list[tuple[int, int]] = []

    def alphas_of(k: int, ids: Sequence[str]) -> np.ndarray:
        asked.append((k, len(ids)))
        if k == noise_only:
            return np.zeros((len(ids), 4))
        alphas = rng.normal(size=(len(ids), 4))
        feature = next(f for f in truth.features if f.class_index == k)
        positives = set(contrast_images(truth, feature, contrast)[0])  # type: ignore[arg-type]
        alphas[:, 2] = [5.0 if i in positives else 0.0 for i in ids]
        return alphas

    labels = label_planted_features(truth, alphas_of, contrast)  # type: ignore[arg-type]
    assert [label.feature for label in labels] == [f.name for f in truth.features]
    assert [k for k, _ in asked] == [f.class_index for f in truth.features]
    for label in labels:
        assert len(label.aucs) == 4 and label.auc == max(label.aucs)
        if label.class_index == noise_only:
            assert (label.component, label.auc, label.accepted) == (0, 0.5, False)
        else:
            assert (label.component, label.auc, label.accepted) == (2, 1.0, True)


def test_local_ratio_is_one_for_uniform_energy_and_the_inverse_area_when_it_fills_one_window() -> None:
    mask = np.zeros((6, 10), dtype=bool)
    mask[1:5, 2:9] = True  # any shape: the window is the mask itself, wherever it fits best
    uniform = torch.full((1, 3, SIZE, SIZE), 0.7)
    assert local_concentration(uniform, [mask])[0] == pytest.approx(1.0)
    placed = torch.full((1, 3, SIZE, SIZE), 0.5)
    placed[0, :, 40:46, 20:30] = torch.where(torch.from_numpy(mask), 0.9, 0.5)
    area = mask.sum() / SIZE**2
    assert local_concentration(placed, [mask])[0] == pytest.approx(1 / area)
    two = torch.stack([uniform[0], placed[0]])  # a batch, and an average over masks
    np.testing.assert_allclose(local_concentration(two, [mask, mask]), [1.0, 1 / area])


def test_the_stripe_band_holds_the_generators_stripes_and_nothing_else() -> None:
    band = stripe_band(SIZE)
    np.testing.assert_array_equal(band, np.roll(band[::-1, ::-1], 1, axis=(0, 1)))  # f and -f together
    assert not band[0, 0]
    middle = sum(STRIPE_PERIODS) / 2  # the band's edges fall between grid points
    for angle in STRIPE_ANGLES:
        cycles = 1 / middle  # per image side
        fy, fx = round(cycles * math.sin(angle)), round(cycles * math.cos(angle))
        assert band[fy % SIZE, fx % SIZE], angle
    assert not band[0, round(1 / STRIPE_PERIODS[0])]  # horizontal waves: not the stripes' direction


def test_spectral_ratio_is_about_one_for_noise_and_high_for_stripes() -> None:
    noise = 0.5 + 0.05 * torch.randn(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert float(spectral_concentration(noise).mean()) == pytest.approx(1.0, abs=0.05)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    angle, period = STRIPE_ANGLES[0], sum(STRIPE_PERIODS) / 2 * SIZE
    stripes = 0.5 + 0.2 * torch.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    ratio = float(spectral_concentration(stripes.expand(1, 3, SIZE, SIZE))[0])
    assert ratio > 0.5 / (stripe_band(SIZE).sum() / (SIZE**2 - 1))  # half its power in the band, at least


def test_concentration_ratio_uses_the_feature_masks_or_the_band(small: tuple[Path, GroundTruth]) -> None:
    root, truth = small
    image = torch.full((1, 3, SIZE, SIZE), 0.5)
    image[0, :, :8, :8] = 0.9
    for feature in truth.features:
        ratio = concentration_ratio(image, root, truth, feature)
        if feature.kind == "background_pattern":
            np.testing.assert_allclose(ratio, spectral_concentration(image))
        else:
            crops = feature_crops(root, truth, feature)
            assert len(crops) == 6
            for mask, patch in crops:
                assert mask.any() and mask.dtype == bool and patch.shape == (3, *mask.shape)
            np.testing.assert_allclose(ratio, local_concentration(image, [mask for mask, _ in crops]))


def test_template_match_is_one_where_the_feature_is_drawn_and_low_on_noise(small: tuple[Path, GroundTruth]) -> None:
    """The feature pasted from its own spurious-test image matches it exactly (cosine 1); on
    gray with noise, and at a scale of the template's contrast, the match stays near noise level."""
    root, truth = small
    flower = next(f for f in truth.features if f.name == "flower")
    crops = feature_crops(root, truth, flower)
    mask, patch = crops[0]
    pasted = torch.full((1, 3, SIZE, SIZE), 0.5)
    h, w = mask.shape
    region = pasted[0, :, 10:10 + h, 20:20 + w]
    region[:] = torch.where(torch.from_numpy(mask), 0.5 + 0.3 * (torch.from_numpy(patch).float() - 0.5), region)
    assert template_match(pasted, crops[:1])[0] == pytest.approx(1.0)
    noise = 0.5 + 0.05 * torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert float(template_match(noise, crops).max()) < 0.25
