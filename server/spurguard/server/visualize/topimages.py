"""The fit images a component is strongest on (SPEC §1 (a)), and their thumbnails.

Image ids are paths relative to the fit's dataset root, read back from the store; they are
checked lexically before use (no absolute paths, no `..`), so a corrupted or crafted id can
never name a file outside the root. Where a link in the root leads is checked when the file is
read (serving.paths.DataRoots.read), against the server's data roots.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import numpy as np
import torch

from spurguard.server.backends.base import PreprocessConfig
from spurguard.server.backends.images import denormalize, encode_png
from spurguard.server.engine.components import ClassComponents
from spurguard.server.errors import FailedPrecondition, InvalidInput
from spurguard.server.visualize._objective import component_rows


class TopImage(NamedTuple):
    image_id: str  # path relative to the dataset root
    alpha: float


def top_images(components: ClassComponents, index: int, k: int) -> list[TopImage]:
    """The k fit images with the largest alpha of component `index`, descending; ties keep fit order."""
    (index,) = component_rows(components, [index])
    if k < 1:
        raise InvalidInput(f"k must be at least 1, got {k}")
    alphas = components.alphas
    if alphas.shape[0] != len(components.image_ids):
        raise FailedPrecondition(
            f"class {components.class_index}: {len(components.image_ids)} fit image ids "
            f"but {alphas.shape[0]} rows of alphas"
        )
    if alphas.shape[0] == 0:
        return []
    column = alphas[:, index].astype(np.float64)
    order = np.argsort(-column, kind="stable")[:k]
    return [TopImage(components.image_ids[i], float(column[i])) for i in order]


def fit_image_path(root: str | os.PathLike[str], image_id: str) -> Path:
    """root / image_id, refusing ids that are absolute or climb out of the root."""
    if not image_id or "\x00" in image_id:
        raise InvalidInput(f"invalid image id {image_id!r}")
    posix, windows = PurePosixPath(image_id), PureWindowsPath(image_id)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        raise InvalidInput(f"image id {image_id!r} must be a path inside the dataset root")
    return Path(root) / posix


def thumbnail_pngs(inputs: torch.Tensor, config: PreprocessConfig) -> list[bytes]:
    """PNG bytes of model inputs [N,3,S,S]: the crop the model saw, which heatmaps are drawn on."""
    return [encode_png(image) for image in denormalize(inputs, config)]
