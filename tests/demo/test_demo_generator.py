"""The planted-spurious generator: deterministic, in the SPEC §2 layouts, and truthful about
which image carries which feature, where."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from spurguard.server.datasets import ClassResolver, list_image_folder, list_spurious_folder
from spurguard.server.demo import (
    CLASSES,
    FEATURE_SPECS,
    DemoDataset,
    GroundTruth,
    generate,
    load_ground_truth,
    without_feature,
)

CYAN_TEXT = (0, 255, 255)  # the stamp's text, a colour no object or background has
PETAL = (255, 38, 191)  # the flower's petals, likewise
SMALL = {"train_per_class": 10, "test_per_class": 2, "spurious_per_feature": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _count(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((pixels == np.array(colour, np.uint8)).all(axis=-1).sum())


@pytest.fixture(scope="module")
def truth(demo_data: DemoDataset) -> GroundTruth:
    return load_ground_truth(demo_data.root)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    first, again, other = (_files(generate(tmp_path / name, seed, **SMALL).root)
                           for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    assert first == again
    images = [name for name in first if name.endswith(".png") and not name.startswith("masks/")]
    assert len(images) == 6 * (10 + 2) + 3 * 4 and set(images) <= other.keys()
    assert sum(first[name] != other[name] for name in images) == len(images)


def test_refuses_a_folder_with_files(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate(tmp_path, **SMALL)


def test_layouts_parse_as_dataset_folders(demo_data: DemoDataset, truth: GroundTruth) -> None:
    config = truth.config
    resolver = ClassResolver(list(demo_data.classes))
    assert demo_data.paths["classes"].read_text().splitlines() == list(CLASSES) == list(truth.classes)
    for split, per_class in (("train", config.train_per_class), ("clean_test", config.test_per_class)):
        entries = list_image_folder(demo_data.paths[split], resolver)
        assert Counter(e.class_index for e in entries) == {k: per_class for k in range(len(CLASSES))}
    spurious = list_spurious_folder(demo_data.paths["spurious_test"], len(CLASSES))
    assert Counter(e.class_index for e in spurious) == {
        spec.class_index: config.spurious_per_feature for spec in FEATURE_SPECS
    }
    assert {e.component_index for e in spurious} == {0}  # placeholder until a fit names the component
    assert [(f.name, f.kind, f.class_index) for f in demo_data.features] == [
        (s.name, s.kind, s.class_index) for s in FEATURE_SPECS
    ]
    assert demo_data.features == truth.features
    assert len({s.kind for s in FEATURE_SPECS}) == 3 and len({s.class_index for s in FEATURE_SPECS}) == 3


def test_rates_measured_from_the_ground_truth(truth: GroundTruth) -> None:
    train = [t for t in truth.images.values() if t.split == "train"]
    for feature in truth.features:
        mine = [t.has(feature.name) for t in train if t.class_index == feature.class_index]
        others = [t.has(feature.name) for t in train if t.class_index != feature.class_index]
        rate_in, rate_out = np.mean(mine), np.mean(others)
        assert 0.6 <= rate_in <= 0.9 and 0 < rate_out <= 0.05, feature.name
        assert (rate_in, rate_out) == pytest.approx((feature.rate_in_class, feature.rate_elsewhere))


def test_clean_and_spurious_test_sets(truth: GroundTruth) -> None:
    clean = [t for t in truth.images.values() if t.split == "clean_test"]
    assert clean and all(not t.features for t in clean)
    by_folder: dict[str, list] = {}
    for image_id, t in truth.images.items():
        if t.split == "spurious_test":
            by_folder.setdefault(image_id.split("/")[1], []).append(t)
    for feature in truth.features:
        images = by_folder[Path(feature.spurious_folder).name]
        assert all([f.name for f in t.features] == [feature.name] for t in images)
        assert all(t.class_index != feature.class_index for t in images)  # never the class-k object
        assert sum(t.class_index is None for t in images) == len(images) // 2 + len(images) % 2


def test_masks_match_what_is_drawn(demo_data: DemoDataset, truth: GroundTruth) -> None:
    """Every listed feature has a mask at its bbox; the feature's own colours appear exactly in
    the images that list it (the stamp's text, the flower's petals); stripes cover the background."""
    root = demo_data.root
    referenced = set()
    for image_id, t in truth.images.items():
        pixels = np.asarray(Image.open(root / image_id).convert("RGB"))
        names = {f.name for f in t.features}
        assert (_count(pixels, CYAN_TEXT) >= 40) == ("watermark" in names), image_id
        assert (_count(pixels, PETAL) >= 20) == ("flower" in names), image_id
        for f in t.features:
            referenced.add(f.mask)
            mask = np.asarray(Image.open(root / f.mask)).astype(bool)
            assert mask.shape == pixels.shape[:2]
            ys, xs = np.nonzero(mask)
            assert f.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            if f.name == "watermark":
                x0, y0, x1, y1 = f.bbox
                assert mask.sum() == (x1 - x0) * (y1 - y0) and _count(pixels[mask][None], CYAN_TEXT) >= 40
            elif f.name == "flower":
                assert _count(pixels[mask][None], PETAL) >= 20
            else:
                assert mask.mean() > 0.3
    on_disk = {p.relative_to(root).as_posix() for p in (root / "masks").rglob("*.png")}
    assert on_disk == referenced


def test_without_feature_changes_only_the_feature(tmp_path: Path) -> None:
    """The counterfactual behind make demo's trigger ground truth: the same image, pixel for
    pixel, except where the feature was painted, and the feature's own colours gone."""
    data = generate(tmp_path / "data", 3, **SMALL)
    truth = load_ground_truth(data.root)
    checked = Counter()
    for image_id, image in truth.images.items():
        if image.split != "spurious_test":
            continue
        (feature,) = image.features
        real = np.asarray(Image.open(data.root / image_id).convert("RGB"))
        without = without_feature(truth.config, image_id)
        mask = np.asarray(Image.open(data.root / feature.mask)) > 0
        assert without.shape == real.shape and without.dtype == np.uint8
        beside = ndimage.binary_dilation(mask)  # anti-aliased edges blend with what lies under them
        assert np.array_equal(without[~beside], real[~beside]), image_id
        assert np.abs(without[mask].astype(int) - real[mask]).mean() > 10, image_id  # stripes: half of it
        assert _count(without, CYAN_TEXT) == _count(without, PETAL) == 0
        checked[feature.name] += 1
    assert checked == {spec.name: SMALL["spurious_per_feature"] for spec in FEATURE_SPECS}
    with pytest.raises(ValueError, match="not a spurious-test image"):
        without_feature(truth.config, next(i for i in truth.images if i.startswith("train/")))
