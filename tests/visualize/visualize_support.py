"""A backbone with planted, hand-set feature detectors, and the components and images to probe it.

Feature 0 ("red") is mean_window(R - (G+B)/2) + 0.05 over 3x3 windows, after ReLU and a global
average pool: slightly active on gray (so the attack has a gradient at its start), dead on the
cyan background of probe images, strongly active on their red square. Other features are
distractors active elsewhere (green, brightness, edges), one is dead on gray (blue - 0.03), and
two per-pixel ramps ReLU(R - 0.4), ReLU(R - 0.6) make a component whose alpha is a tent in the
red level, peaking at R = 0.6 inside the attack's ball: an ascent must stop there, not at the
boundary. Weights are written in [0, 1] pixel units and converted to the normalised input.

The same model also ships as a model directory (`write_model_dir`) with a generated dataset
whose class-0 images partly carry the red square (`write_dataset`), for the rpc and cli tests
that serve, fit and visualise it.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image
from torch import nn

from spurguard.server.backends import PreprocessConfig, TorchBackend
from spurguard.server.engine import ClassComponents

SIZE = 32
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.4)  # G and B unlike R: tests can tell pixel units from normalised ones
CLASSES = 3
PLANTED_CLASS = 0
SQUARE = slice(2, 10)  # rows and columns of PROBE's red square: 8x8 = 6.25% of the image
BACKGROUND = (0.1, 0.7, 0.7)
RED = (0.95, 0.05, 0.05)

_MEAN_WINDOW = torch.full((3, 3), 1 / 9)
_CENTRE = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
_LAPLACIAN = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
# (pixel-space colour coefficients R, G, B; 3x3 window; bias) of each detector
_DETECTORS = [
    ((1.0, -0.5, -0.5), _MEAN_WINDOW, 0.05),  # 0: red, the planted feature
    ((-0.5, 1.0, -0.5), _MEAN_WINDOW, 0.05),  # 1: green
    ((-0.5, -0.5, 1.0), _MEAN_WINDOW, -0.03),  # 2: blue, dead on gray
    ((1 / 3, 1 / 3, 1 / 3), _MEAN_WINDOW, -0.3),  # 3: brightness
    ((1 / 3, 1 / 3, 1 / 3), _LAPLACIAN, 0.0),  # 4: edges
    ((1.0, 0.0, 0.0), _CENTRE, -0.4),  # 5: red level above 0.4
    ((1.0, 0.0, 0.0), _CENTRE, -0.6),  # 6: red level above 0.6
]
FEATURES = len(_DETECTORS)

# Components of the planted class (rows of ClassComponents.vectors), orthonormal.
RED_COMPONENT, GREEN_COMPONENT, BLUE_COMPONENT, MIXED_COMPONENT, TENT_COMPONENT = 0, 1, 2, 3, 4
# With head weights 1 and 3 on features 5 and 6 and v = (3, -2) / sqrt(13) there, alpha =
# 3 (phi_5 - 2 phi_6) / 13 = 3 / 13 * mean(tent(R)), tent(r) = ReLU(r - 0.4) - 2 ReLU(r - 0.6).
TENT_PEAK_ALPHA = 3 / 13 * 0.2  # every pixel at R = 0.6: |x - gray| = 0.1 * SIZE = 3.2 < eps


class PlantedCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.detect = nn.Conv2d(3, FEATURES, 3, padding=1)
        self.act = nn.ReLU()
        self.down = nn.AvgPool2d(2)  # a 16x16 map: Grad-CAM there must upsample
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        kernel = torch.stack([torch.tensor(colour).view(3, 1, 1) * window for colour, window, _ in _DETECTORS])
        bias = torch.tensor([b for _, _, b in _DETECTORS])
        std, mean = torch.tensor(STD).view(1, 3, 1, 1), torch.tensor(MEAN).view(1, 3, 1, 1)
        with torch.no_grad():  # w.x + b in pixels == (w*std).z + (b + sum(w*mean)) in normalised z
            self.detect.weight.copy_(kernel * std)
            self.detect.bias.copy_(bias + (kernel * mean).sum(dim=(1, 2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.down(self.act(self.detect(x)))))


HEAD_WEIGHT = (
    (2.0, 0.5, 1.0, 0.3, 0.2, 1.0, 3.0),
    (-1.0, 1.0, 0.0, 0.5, 0.1, 0.2, -0.3),
    (0.0, -0.5, 1.0, 0.2, 0.3, -0.4, 0.1),
)
HEAD_BIAS = (0.1, -0.2, 0.3)


def make_backend(backbone: nn.Module, name: str = "planted", digest: str = "0" * 64) -> TorchBackend:
    return TorchBackend(
        name=name,
        digest=digest,
        backbone=backbone,
        weight=torch.tensor(HEAD_WEIGHT),
        bias=torch.tensor(HEAD_BIAS),
        preprocess_config=PreprocessConfig(size=SIZE, resize=SIZE, interpolation="bilinear", mean=MEAN, std=STD),
        device="cpu",
        max_batch_size=4,
    )


def write_model_dir(root: Path, name: str = "planted") -> Path:
    """The planted CNN as a SPEC §2 model directory (TorchScript backbone by torch.jit.trace)."""
    root.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: deprecated, supported
        torch.jit.trace(PlantedCNN().eval(), torch.zeros(2, 3, SIZE, SIZE)).save(str(root / "backbone.pt"))
    safetensors.torch.save_file(
        {"weight": torch.tensor(HEAD_WEIGHT), "bias": torch.tensor(HEAD_BIAS)}, str(root / "head.safetensors")
    )
    (root / "classes.txt").write_text("red thing\ngreen <thing>\nblue & thing\n")  # HTML-hostile on purpose
    (root / "model.toml").write_text(
        f'name = "{name}"\nbackbone = "backbone.pt"\nhead = "head.safetensors"\nclasses = "classes.txt"\n'
        f'[preprocess]\nsize = {SIZE}\nresize = {SIZE}\ninterpolation = "bilinear"\n'
        f"mean = {list(MEAN)}\nstd = {list(STD)}\n"
    )
    return root


def write_dataset(root: Path, per_class: int = 8, patched: int = 4, seed: int = 0) -> list[str]:
    """root/<class>/<image>.png; in class PLANTED_CLASS the first `patched` images carry the red
    square at a random place (the planted feature), the others of every class do not.
    Returns the patched images' ids (paths relative to root)."""
    rng = np.random.default_rng(seed)
    backgrounds = {PLANTED_CLASS: BACKGROUND, 1: (0.2, 0.8, 0.3), 2: (0.3, 0.3, 0.8)}
    ids = []
    for k in range(CLASSES):
        (root / str(k)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.array(backgrounds[k]) + rng.uniform(-0.08, 0.08, size=(SIZE, SIZE, 3))
            name = f"{k}/plain_{i:02d}.png"
            if k == PLANTED_CLASS and i < patched:
                top, left = rng.integers(0, SIZE - 8, size=2)
                pixels[top : top + 8, left : left + 8] = RED
                name = f"{k}/patched_{i:02d}.png"
                ids.append(name)
            image = np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(image).save(root / name)
    return ids


def planted_components() -> ClassComponents:
    vectors = np.zeros((5, FEATURES))
    vectors[RED_COMPONENT, 0] = 1.0
    vectors[GREEN_COMPONENT, 1] = 1.0
    vectors[BLUE_COMPONENT, 2] = 1.0
    vectors[MIXED_COMPONENT, 3:5] = 1.0 / math.sqrt(2.0)
    vectors[TENT_COMPONENT, 5:7] = np.array([3.0, -2.0]) / math.sqrt(13.0)
    eigenvalues = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    return ClassComponents(
        class_index=PLANTED_CLASS,
        count=10,
        mean=np.array([0.1, 0.2, 0.05, 0.05, 0.1, 0.0, 0.0]),
        eigenvalues=eigenvalues,
        vectors=vectors,
        total_variance=float(eigenvalues.sum()) + 0.5,
    )


def probe_image(seed: int) -> np.ndarray:
    """uint8 HxWx3: the cyan background with mild noise and the red square at SQUARE."""
    rng = np.random.default_rng(seed)
    pixels = np.array(BACKGROUND) + rng.uniform(-0.05, 0.05, size=(SIZE, SIZE, 3))
    pixels[SQUARE, SQUARE] = RED
    return np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def square_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[SQUARE, SQUARE] = True
    return mask
