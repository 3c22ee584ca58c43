"""The one protocol every model backend implements, so the engine never knows where a model runs.

Forward-only work (fit, score, evaluate) needs `Backend`; gradient work (feature attacks,
heatmaps) needs `GradientBackend`, which only an in-process torch backend can offer (a Triton
backend runs the backbone out of process, keeping just the head local).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from PIL import Image

from spurguard.server.errors import InvalidInput

if TYPE_CHECKING:
    from spurguard.server.backends.images import OpenedImage

ImageInput = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image]
INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class ImageLimits:
    """Caps on one input image; over a cap is RESOURCE_EXHAUSTED, checked before decoding.

    max_pixels may not exceed PIL.Image.MAX_IMAGE_PIXELS: every image PIL's decompression-bomb
    check warns about is then over our limit too, and is rejected whatever the warning filters.
    """

    max_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000
    # An encoded image of at least bomb_min_pixels that claims more than max_pixels_per_byte pixels
    # per byte of its file is a decompression bomb, INVALID_ARGUMENT (backends/images.py says why
    # these numbers).
    max_pixels_per_byte: float = 2000.0
    bomb_min_pixels: int = 2**22

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_pixels_per_byte, self.bomb_min_pixels) <= 0:
            raise InvalidInput("image limits must be positive")
        pil_limit = Image.MAX_IMAGE_PIXELS
        if pil_limit is not None and self.max_pixels > pil_limit:
            raise InvalidInput(
                f"max_pixels {self.max_pixels} is over PIL.Image.MAX_IMAGE_PIXELS ({pil_limit}); "
                "raise that too"
            )


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class PreprocessConfig:
    """The [preprocess] table of model.toml: shorter side to `resize`, centre crop `size`, normalise."""

    size: int
    resize: int
    interpolation: Literal["bicubic", "bilinear"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise InvalidInput(f"preprocess.size must be positive, got {self.size}")
        if self.resize < self.size:
            raise InvalidInput(f"preprocess.resize ({self.resize}) must be >= preprocess.size ({self.size})")
        if self.interpolation not in INTERPOLATIONS:
            raise InvalidInput(
                f"preprocess.interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise InvalidInput("preprocess.mean and preprocess.std must have 3 values (R, G, B)")
        if not all(math.isfinite(m) for m in self.mean):
            raise InvalidInput("preprocess.mean values must be finite")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise InvalidInput("preprocess.std values must be positive")


@runtime_checkable
class Backend(Protocol):
    """A classifier split as logits = W · phi(x) + b, with its own image preprocessing."""

    name: str
    digest: str  # sha256 hex over weights, classes and preprocessing: fits are keyed by (name, digest)
    kind: str  # "torch", "triton", ...
    runtime: str  # where forward-only work runs: "torch", "onnxruntime", "openvino", "triton"
    device: str  # where forward-only work runs, e.g. "cpu", "cuda:0", a Triton URL
    num_classes: int  # C
    feature_dim: int  # d
    input_size: int  # side of the square model input
    class_names: list[str]
    class_wnids: list[str | None]
    preprocess_config: PreprocessConfig
    limits: ImageLimits
    max_batch_size: int  # images per backbone forward pass
    # Forward passes that may run at once: 1 in process (one pass uses every core); more where
    # the pass runs remotely (Triton), so that the next request travels while one computes.
    batches_in_flight: int

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Encoded bytes / uint8 arrays / PIL images to float32 [N,3,size,size] on the CPU."""
        ...

    def decode_crop(self, image: ImageInput) -> np.ndarray:
        """preprocess's per-image half: one image to its uint8 [size,size,3] crop, without torch
        (runs in decode threads next to the forward pass)."""
        ...

    def open_image(self, image: ImageInput) -> OpenedImage:
        """decode_crop in two steps: this one reads and checks the header and says what decoding
        will cost; `.crop(preprocess_config)` then decodes."""
        ...

    def stack_crops(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """preprocess's batch half: uint8 crops to float32 [N,3,size,size] on the CPU."""
        ...

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): float32 [N,d] on the CPU, no autograd graph; batched internally."""
        ...

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [C,d], b [C]) float32 CPU tensors."""
        ...

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """W · phi + b for features [N,d] on any device, keeping autograd."""
        ...

    def warm_up(self, batch_size: int | None = None) -> float:
        """Run one batch so that the first request is not slow; returns the seconds it took."""
        ...


@runtime_checkable
class GradientBackend(Backend, Protocol):
    """A backend whose backbone runs in this process and can be differentiated."""

    module: torch.nn.Module  # the backbone (nn.Module, ScriptModule or exported GraphModule)
    torch_device: torch.device  # where features_with_grad runs (`device` may name a remote forward)

    def features_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) [N,d] on the backend's device, with an autograd graph back to `x`."""
        ...
