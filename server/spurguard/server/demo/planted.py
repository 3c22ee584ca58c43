"""What the demo's ground truth says about a fitted model: which component carries each planted
feature, and whether a feature attack draws that feature.

Both work on numbers the caller computes however it likes (over gRPC in `make demo`, with the
engine in memory in the bench and the tests), so one definition serves all of them.

Labelling (`label_planted_features`): for the feature of class k, each of k's first `search`
components is scored by the ROC AUC of its alpha at telling two sets of images apart. The
contrast ``feature_only`` (default) sets the feature's spurious-test images (the feature, and at
most a small object of another class) against k's clean test images: the component that the
feature alone drives above the class itself. ``in_class`` sets k's training images with the
feature against those without. On the standard demo model the two disagree for `star`: the
component whose top images all show the watermark (in-class AUC 0.93) sits below clean stars on
watermark-only images (issue 13), so only ``feature_only`` says which one a watermark alone
triggers. The best component is `accepted` (to be labelled spurious) when its AUC reaches MIN_AUC.

Readability (`concentration_ratio`): how much of an attack image's change from gray lies where
the feature would be, relative to that region's share, so 1 means "spread as if uniform".
- Local features (watermark, flower): energy E = sum over channels of |x - gray| per pixel. A
  feature-shaped window (each of the feature's spurious-test masks, cropped to its box) is
  placed where it catches the most energy; the ratio is that window's share of all energy
  divided by its share of the image, averaged over the masks. A CNN's attack has no fixed place
  for the feature, hence the best placement; a texture tiled over the image scores near 1, one
  drawn stamp or flower high.
- The background pattern (stripes) covers the whole background, so its region is in frequency:
  the band of wave vectors the generator draws stripes from (periods STRIPE_PERIODS of the
  side, directions STRIPE_ANGLES ± STRIPE_ANGLE_SPREAD). The ratio is the share of the power of
  x - gray (all channels, mean removed) in that band divided by the band's share of the
  frequencies: 1 for white noise.

The window ratio measures where the energy is, not what it draws, and a bag-of-local-features
CNN tiles a local feature over the whole attack image, so it undersells a clearly drawn flower.
`template_match` asks what is drawn: the best cosine, over placements, between the attack's
x - gray and the feature's own pixels - gray on its spurious-test images, within the feature's
mask (white noise: about 0.13).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spurguard.server.demo.generator import (
    STRIPE_ANGLE_SPREAD,
    STRIPE_ANGLES,
    STRIPE_PERIODS,
    GroundTruth,
    PlantedFeature,
)
from spurguard.server.backends import Backend
from spurguard.server.engine import ClassComponents, fit_alphas, fit_components, roc_auc

Contrast = Literal["feature_only", "in_class"]
CONTRASTS: tuple[Contrast, ...] = ("feature_only", "in_class")
LABEL_SEARCH = 10  # components looked at per class, as the paper's labellers did
# A component is labelled when it ranks a random feature image above a random contrast image in
# at least 4 of 5 pairs; the chosen components of both demo models reach >= 0.9.
MIN_AUC = 0.8
MASKS_PER_FEATURE = 16  # feature-shaped windows averaged in the local ratio
GRAY = 0.5

# alphas_of(class_index, image_ids) -> [len(image_ids), L] alphas of the class's components, in index order
AlphasOf = Callable[[int, Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class PlantedLabel:
    """A planted feature, the component of its class chosen for it, and every AUC looked at."""

    feature: str
    class_index: int
    component: int  # the best one
    auc: float  # its AUC
    aucs: tuple[float, ...]

    @property
    def accepted(self) -> bool:
        """Whether the best component is clear enough to label (MIN_AUC)."""
        return self.auc >= MIN_AUC


def contrast_images(truth: GroundTruth, feature: PlantedFeature, contrast: Contrast) -> tuple[list[str], list[str]]:
    """(positive, negative) image ids of a feature's contrast, sorted."""
    k = feature.class_index
    if contrast == "in_class":
        ids = sorted(i for i, t in truth.images.items() if t.split == "train" and t.class_index == k)
        return [i for i in ids if truth.images[i].has(feature.name)], [i for i in ids if not truth.images[i].has(feature.name)]
    if contrast == "feature_only":
        positives = sorted(i for i in truth.images if i.startswith(feature.spurious_folder + "/"))
        negatives = sorted(i for i, t in truth.images.items() if t.split == "clean_test" and t.class_index == k)
        return positives, negatives
    raise ValueError(f"unknown contrast {contrast!r}; use one of {', '.join(CONTRASTS)}")


def label_planted_features(
    truth: GroundTruth, alphas_of: AlphasOf, contrast: Contrast = "feature_only", search: int = LABEL_SEARCH
) -> list[PlantedLabel]:
    """Per planted feature, the component of its class that best separates the contrast (above)."""
    labels = []
    for feature in truth.features:
        positives, negatives = contrast_images(truth, feature, contrast)
        alphas = np.asarray(alphas_of(feature.class_index, positives + negatives))
        has = np.arange(len(alphas)) < len(positives)
        aucs = tuple(roc_auc(has, alphas[:, l]) for l in range(min(search, alphas.shape[1])))
        best = int(np.argmax(aucs))
        labels.append(PlantedLabel(feature.name, feature.class_index, best, aucs[best], aucs))
    return labels


def feature_crops(
    root: Path, truth: GroundTruth, feature: PlantedFeature, limit: int = MASKS_PER_FEATURE
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask bool [h, w], pixels float [3, h, w] in [0, 1]) of the feature on its first `limit`
    spurious-test images, each cropped to the feature's box."""
    crops = []
    for image_id in sorted(i for i in truth.images if i.startswith(feature.spurious_folder + "/"))[:limit]:
        (instance,) = [f for f in truth.images[image_id].features if f.name == feature.name]
        x0, y0, x1, y1 = instance.bbox
        mask = np.asarray(Image.open(Path(root) / instance.mask))[y0:y1, x0:x1] > 0
        pixels = np.asarray(Image.open(Path(root) / image_id).convert("RGB"))[y0:y1, x0:x1]
        crops.append((mask, pixels.transpose(2, 0, 1) / 255.0))
    return crops


def local_concentration(pixels: torch.Tensor, masks: Sequence[np.ndarray]) -> np.ndarray:
    """[B] ratio of the best-placed feature-shaped window (module docstring), pixels [B,3,S,S] in [0, 1]."""
    energy = (pixels.double() - GRAY).abs().sum(dim=1, keepdim=True)  # [B,1,S,S]
    total = energy.sum(dim=(1, 2, 3)).clamp(min=1e-30)
    pixels_in_image = energy.shape[2] * energy.shape[3]
    ratios = []
    for mask in masks:
        kernel = torch.from_numpy(mask).double()[None, None]
        best = F.conv2d(energy, kernel).amax(dim=(1, 2, 3))
        ratios.append((best / total) / (float(kernel.sum()) / pixels_in_image))
    return torch.stack(ratios).mean(dim=0).numpy()


def template_match(pixels: torch.Tensor, crops: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """[B] how much the attack looks like the feature: per crop of the feature (feature_crops),
    the largest cosine over placements between x - gray and the crop's pixels - gray, both within
    the crop's mask; averaged over the crops. 0: unrelated; 1: the feature drawn somewhere."""
    delta = pixels.double() - GRAY
    matches = []
    for mask, patch in crops:
        window = torch.from_numpy(mask).double()
        template = (torch.from_numpy(patch) - GRAY) * window  # [3,h,w]
        dot = F.conv2d(delta, template[None])  # [B,1,...]: sum over channels and the window
        energy = F.conv2d(delta.square(), window.expand(1, 3, *window.shape).contiguous())
        cosine = dot / (energy.sqrt() * template.norm()).clamp(min=1e-30)
        matches.append(cosine.amax(dim=(1, 2, 3)))
    return torch.stack(matches).mean(dim=0).numpy()


def stripe_band(size: int) -> np.ndarray:
    """bool [S, S] over np.fft.fftfreq's grid: the wave vectors the generator draws stripes from."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")  # cycles per pixel
    radius = np.hypot(fy, fx)
    with np.errstate(divide="ignore"):
        period = np.where(radius > 0, 1.0 / radius, np.inf) / size  # share of the side
    angle = np.arctan2(fy, fx) % math.pi  # a wave and its negative are one stripe direction
    near = np.zeros_like(radius, dtype=bool)
    for centre in STRIPE_ANGLES:
        gap = np.abs((angle - centre + math.pi / 2) % math.pi - math.pi / 2)
        near |= gap <= STRIPE_ANGLE_SPREAD
    return near & (period >= STRIPE_PERIODS[0]) & (period <= STRIPE_PERIODS[1])


def spectral_concentration(pixels: torch.Tensor) -> np.ndarray:
    """[B] share of the power of x - gray in the stripes' band over the band's share (module docstring)."""
    delta = pixels.double().numpy() - GRAY
    delta = delta - delta.mean(axis=(2, 3), keepdims=True)
    power = (np.abs(np.fft.fft2(delta)) ** 2).sum(axis=1)  # [B,S,S]
    band = stripe_band(delta.shape[-1])
    nonzero = np.ones_like(band)
    nonzero[0, 0] = False  # the mean, removed
    share = power[:, band].sum(axis=1) / np.maximum(power[:, nonzero].sum(axis=1), 1e-30)
    return share / (band.sum() / nonzero.sum())


def concentration_ratio(pixels: torch.Tensor, root: Path, truth: GroundTruth, feature: PlantedFeature) -> np.ndarray:
    """[B] energy concentration ratio of attack images [B,3,S,S] in [0, 1] on `feature` (1 = uniform)."""
    if feature.kind == "background_pattern":
        return spectral_concentration(pixels)
    return local_concentration(pixels, [mask for mask, _ in feature_crops(root, truth, feature)])


def fit_planted_classes(backend: Backend, root: Path, truth: GroundTruth, num_components: int) -> dict[int, ClassComponents]:
    """Neural PCA of each planted feature's class on the training set, with its fit images' alphas
    (what a Fit of those classes stores), in memory."""
    classes = sorted({f.class_index for f in truth.features})
    ids = sorted(i for i, t in truth.images.items() if t.split == "train" and t.class_index in classes)
    phi = _features(backend, root, ids)
    labels = torch.tensor([truth.images[i].class_index for i in ids])
    weight, _ = backend.head()
    fitted = fit_components(weight, phi, labels, num_components)
    for k in classes:
        rows = (labels == k).nonzero().squeeze(1)
        fitted[k].image_ids = [ids[i] for i in rows.tolist()]
        fitted[k].alphas = fit_alphas(fitted[k], weight[k], phi[rows])
    return {k: fitted[k] for k in classes}


def engine_alphas(backend: Backend, root: Path, components: dict[int, ClassComponents]) -> AlphasOf:
    """alphas_of for label_planted_features, computed in memory."""
    weight, _ = backend.head()

    def alphas_of(class_index: int, image_ids: Sequence[str]) -> np.ndarray:
        return fit_alphas(components[class_index], weight[class_index], _features(backend, root, image_ids))

    return alphas_of


def _features(backend: Backend, root: Path, image_ids: Sequence[str], chunk: int = 256) -> torch.Tensor:
    return torch.cat([
        backend.features(backend.preprocess([(Path(root) / i).read_bytes() for i in image_ids[start:start + chunk]]))
        for start in range(0, len(image_ids), chunk)
    ])
