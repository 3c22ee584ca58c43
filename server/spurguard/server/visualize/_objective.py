"""alpha_l(x) as a differentiable function of the model input, shared by attacks and heatmaps.

Both need, per input image, the contribution of one component of one class and its gradient;
building the projection once here (float64 via `class_projection`, then the backend's device)
keeps the two paths numerically identical.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from spurguard.server.backends.base import Backend, GradientBackend
from spurguard.server.engine.components import ClassComponents
from spurguard.server.engine.decompose import check_components, class_projection
from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound, ResourceExhausted

GRAY = 0.5  # the neutral image, in [0, 1] pixel units: where attacks start and what "no evidence" looks like


def require_gradients(backend: Backend, purpose: str) -> GradientBackend:
    """The backend, if its backbone can be differentiated here; else why not, for the client."""
    if not callable(getattr(backend, "features_with_grad", None)):
        raise FailedPrecondition(
            f"{purpose} need a local torch backend with gradients; "
            f"model {backend.name} runs on {backend.kind}"
        )
    return backend  # type: ignore[return-value]  # has features_with_grad, checked above


def component_rows(components: ClassComponents, indices: Sequence[int]) -> list[int]:
    """Component indices as ints, each checked against the fit (NotFound for an unknown one)."""
    rows = [int(i) for i in indices]
    if not rows:
        raise InvalidInput("no components given")
    for i in rows:
        if not 0 <= i < components.num_components:
            raise NotFound(
                f"class {components.class_index} has no component {i} "
                f"(fitted components: 0..{components.num_components - 1})"
            )
    return rows


class ComponentObjective:
    """Row i of a batch is scored by alpha of component `rows[i]` of one class."""

    def __init__(self, backend: Backend, components: ClassComponents, rows: Sequence[int], purpose: str) -> None:
        self.backend = require_gradients(backend, purpose)
        self.rows = component_rows(components, rows)
        weight, _ = backend.head()
        check_components({components.class_index: components}, weight.shape[0], weight.shape[1])
        self.class_index = components.class_index
        self.device = self.backend.torch_device
        projection = class_projection(components, weight[self.class_index], rows=self.rows, device=self.device)
        self.directions = projection.directions  # [B, d]
        self.offsets = projection.offsets  # [B]
        config = backend.preprocess_config  # input = (pixels - mean) / std, pixels in [0, 1]
        self.mean = torch.tensor(config.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.gray_input = (GRAY - self.mean) / self.std  # [1,3,1,1]: the attack's start, IG's baseline

    def __len__(self) -> int:
        return len(self.rows)

    @contextmanager
    def gradient_memory(self, images: int) -> Iterator[None]:
        """Device memory running out under a gradient pass means the request was too big for it."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise ResourceExhausted(
                f"model {self.backend.name}: gradients for {images} images at once do not fit on "
                f"{self.device}; ask for fewer"
            ) from None

    def alphas(self, features: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """alpha [n] of each image for its own component; `rows` picks a chunk of the batch."""
        return (features * self.directions[rows]).sum(dim=1) - self.offsets[rows]

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """p(k|x) [n] for the objective's class k."""
        return torch.softmax(self.backend.logits(features), dim=1)[:, self.class_index]
