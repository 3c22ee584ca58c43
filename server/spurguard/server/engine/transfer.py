"""Transfer of labelled components to another model: the paper's max_cov (SPEC §1 transfer).

For a labelled component l of class k of a source model, and a target model with weighted
activations a' = w'_k * phi'(x), over the source fit's images x_i of class k:
    d_l = normalise(sum_i alpha_l(x_i) (a'(x_i) - m')),  m' = the mean of a' over those images:
the unit direction of a' whose projection covaries most with the source's alpha_l. That largest
covariance, ||sum_i alpha_l(x_i) (a'(x_i) - m')|| / (n - 1) (n - 1 like the fit's covariances), is
reported as the direction's `covariance`. Its contribution to logit'_k is
<a'(x) - m', d_l> <1, d_l>. When a class has several directions D = [d_1; ...; d_m], a' - m' is
projected onto their span by least squares, c = argmin ||D^T c - (a' - m')||, and direction l
contributes c_l <1, d_l>: the contributions sum to <1, projection>, the projection's
contribution. c = pinv(D^T) (a' - m') is linear in a', so each contribution is
<a' - m', e_l> <1, d_l> with e_l the rows of pinv(D^T), the same linear form as a component's
alpha (engine.decompose.linear_projection), and SpuFix uses it in place of alpha_l.

Why streaming sums: sum_i alpha_l(x_i)(a'_i - m') = sum_i alpha_l a'_i - m' sum_i alpha_l, so one
pass keeping n, sum a', sum alpha a' and sum alpha (O(m d) per class, float64) gives every
direction, however many images there are.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from spurguard.server.engine.components import DEFAULT_FLOOR_PERCENTILE, alpha_floor
from spurguard.server.engine.decompose import ClassProjection, linear_projection
from spurguard.server.engine.npca import as_matrix
from spurguard.server.errors import FailedPrecondition, InvalidInput

# A direction whose sum is this small next to its bound, sum_i |alpha_i| * max |a'|, is rounding
# noise (alpha or a' constant over the images): normalising it would make an arbitrary direction.
_DEGENERATE_REL = 1e-12


@dataclass
class TransferredClass:
    """One class's transferred directions in a target model: what the store keeps, SpuFix applies."""

    class_index: int
    source_components: tuple[int, ...]  # the source fit's component index behind each direction
    count: int  # images the directions were computed over
    mean: np.ndarray  # m', [d] float64: mean weighted activation of the target over those images
    directions: np.ndarray  # [m, d] float64, unit rows d_l
    covariance: np.ndarray  # [m] float64: cov(alpha_l, <a', d_l>), the maximum max_cov reached
    alphas: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [n, m] contributions

    @property
    def num_directions(self) -> int:
        return int(self.directions.shape[0])

    def projection(
        self,
        weight_row: torch.Tensor | np.ndarray,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> ClassProjection:
        """Contributions [N, m] = features @ U.T - offsets: least squares onto the span, times <1, d_l>."""
        dual = np.linalg.pinv(self.directions.T)  # [m, d]; = directions for a single unit direction
        return linear_projection(dual, self.directions.sum(axis=1), self.mean, weight_row, dtype=dtype, device=device)

    def alpha_floor(self, percentile: float = DEFAULT_FLOOR_PERCENTILE) -> np.ndarray:
        """f_l over the images the directions came from, as a fit component's floor."""
        return alpha_floor(self.alphas, self.num_directions, percentile)


class MaxCovAccumulator:
    """The streaming sums of one class: features phi' of the target and the source's alphas, batch by batch."""

    def __init__(self, weight_row: torch.Tensor | np.ndarray, num_directions: int,
                 device: torch.device | str | None = None) -> None:
        if num_directions < 1:
            raise InvalidInput(f"a transfer needs at least one direction, got {num_directions}")
        self._weight = torch.as_tensor(weight_row).detach().to(dtype=torch.float64, device=device)
        dim = int(self._weight.shape[0])
        self.count = 0
        self._sum = torch.zeros(dim, dtype=torch.float64, device=self._weight.device)
        self._cross = torch.zeros(num_directions, dim, dtype=torch.float64, device=self._weight.device)
        self._alpha_sum = torch.zeros(num_directions, dtype=torch.float64, device=self._weight.device)
        self._alpha_abs = torch.zeros(num_directions, dtype=torch.float64, device=self._weight.device)
        self._scale = 0.0  # largest |a'| seen

    def update(self, features: torch.Tensor | np.ndarray, source_alphas: torch.Tensor | np.ndarray) -> None:
        """Add images: target features [n, d] and the source's alphas of the same images [n, m]."""
        x = as_matrix(features, "features", cols=self._weight.shape[0], dtype=torch.float64, device=self._weight.device)
        alphas = as_matrix(source_alphas, "source alphas", cols=self._cross.shape[0], dtype=torch.float64,
                           device=self._weight.device)
        if alphas.shape[0] != x.shape[0]:
            raise InvalidInput(f"{alphas.shape[0]} rows of source alphas for {x.shape[0]} feature rows")
        if x.shape[0] == 0:
            return
        a = x * self._weight
        self.count += int(x.shape[0])
        self._sum += a.sum(dim=0)
        self._cross.addmm_(alphas.T, a)
        self._alpha_sum += alphas.sum(dim=0)
        self._alpha_abs += alphas.abs().sum(dim=0)
        self._scale = max(self._scale, float(a.abs().max()))

    def finalize(self, class_index: int, source_components: Sequence[int]) -> TransferredClass:
        """The class's directions (FAILED_PRECONDITION below two images or for a direction with no covariance)."""
        if len(source_components) != self._cross.shape[0]:
            raise InvalidInput(f"{len(source_components)} source components for {self._cross.shape[0]} directions")
        n = self.count
        if n < 2:
            raise FailedPrecondition(f"class {class_index}: {n} readable image(s); a transfer needs at least 2")
        mean = self._sum / n
        cross = self._cross - self._alpha_sum[:, None] * mean[None, :]  # sum_i alpha_i (a'_i - m')
        norms = cross.norm(dim=1)
        bounds = (_DEGENERATE_REL * self._scale * self._alpha_abs).tolist()
        flat = [c for c, norm, bound in zip(source_components, norms.tolist(), bounds) if not norm > bound]
        if flat:
            raise FailedPrecondition(
                f"class {class_index}: the target's activations do not covary with source component(s) {flat} "
                "over these images, so there is no direction to transfer"
            )
        return TransferredClass(
            class_index=class_index,
            source_components=tuple(int(c) for c in source_components),
            count=n,
            mean=mean.cpu().numpy(),
            directions=(cross / norms[:, None]).cpu().numpy(),
            covariance=(norms / (n - 1)).cpu().numpy(),
        )


def transfer_alphas(
    transferred: TransferredClass, weight_row: torch.Tensor | np.ndarray, features: torch.Tensor | np.ndarray
) -> np.ndarray:
    """Contributions [n, m] (float32, computed in float64) of images with target features [n, d]:
    what TransferredClass.alphas holds for the images the directions came from."""
    x = as_matrix(features, "features", cols=transferred.mean.shape[0], dtype=torch.float64)
    projection = transferred.projection(weight_row, dtype=torch.float64, device=x.device)
    return projection.alphas(x).cpu().numpy().astype(np.float32)
