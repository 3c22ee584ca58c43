"""Top fit images by alpha, their paths under the dataset root (never escaping it), and thumbnails."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spurguard.server.backends import TorchBackend
from spurguard.server.engine import ClassComponents
from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound
from spurguard.server.visualize import (
    TopImage,
    fit_image_path,
    thumbnail_pngs,
    top_images,
)
from visualize_support import SIZE, probe_image


@pytest.fixture
def fitted(components: ClassComponents) -> ClassComponents:
    alphas = np.array(
        [[0.5, 1.0], [2.0, -1.0], [0.5, 3.0], [-1.0, 0.0], [2.0, 0.5]], dtype=np.float32
    )  # two ties in column 0
    ids = [f"0/img{i}.png" for i in range(5)]
    return dataclasses.replace(components, image_ids=ids, alphas=alphas)


def test_top_images_sorted_by_alpha_ties_in_fit_order(fitted: ClassComponents) -> None:
    assert top_images(fitted, 0, 4) == [
        TopImage("0/img1.png", 2.0),
        TopImage("0/img4.png", 2.0),
        TopImage("0/img0.png", 0.5),
        TopImage("0/img2.png", 0.5),
    ]
    assert [t.image_id for t in top_images(fitted, 1, 2)] == ["0/img2.png", "0/img0.png"]
    assert len(top_images(fitted, 1, 50)) == 5


def test_top_images_errors(fitted: ClassComponents) -> None:
    with pytest.raises(InvalidInput, match="k must be at least 1"):
        top_images(fitted, 0, 0)
    with pytest.raises(NotFound, match="no component 7"):
        top_images(fitted, 7, 3)
    broken = dataclasses.replace(fitted, image_ids=fitted.image_ids[:3])
    with pytest.raises(FailedPrecondition, match="3 fit image ids but 5 rows"):
        top_images(broken, 0, 3)
    unfitted = dataclasses.replace(fitted, image_ids=[], alphas=np.zeros((0, 0), np.float32))
    assert top_images(unfitted, 0, 3) == []


@pytest.mark.parametrize(
    "image_id", ["../secret.png", "0/../../secret.png", "/etc/passwd", "C:\\data\\x.png", "..\\x.png", "", "a\x00b"]
)
def test_ids_that_escape_the_root_are_rejected(tmp_path: Path, image_id: str) -> None:
    with pytest.raises(InvalidInput):
        fit_image_path(tmp_path, image_id)


def test_fit_image_paths_lie_under_the_root(tmp_path: Path) -> None:
    assert fit_image_path(tmp_path, "0/a.png") == tmp_path / "0" / "a.png"


def test_thumbnails_are_the_model_crop(tmp_path: Path, backend: TorchBackend) -> None:
    (tmp_path / "0").mkdir()
    images = [probe_image(seed) for seed in range(2)]
    for seed, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "0" / f"{seed}.png")
    inputs = backend.preprocess([fit_image_path(tmp_path, f"0/{seed}.png").read_bytes() for seed in range(2)])
    assert inputs.shape == (2, 3, SIZE, SIZE)
    for png, image in zip(thumbnail_pngs(inputs, backend.preprocess_config), images):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), image)  # size = resize: no scaling
