"""Exact decomposition of a class logit into bias term, component contributions and residual.

logit_k(x) = b_k + <1, m_k> + sum_l alpha_l(x) + residual, with
alpha_l(x) = <a_k(x) - m_k, v_l> <1, v_l> and a_k(x) = w_k * phi(x).

Why precompute: <a_k(x) - m_k, v_l> = <phi(x), w_k * v_l> - <m_k, v_l>, so with the rows
U_kl = (w_k * v_l) <1, v_l> and offsets c_kl = <m_k, v_l> <1, v_l> (both computed once in
float64) scoring a batch is one float32 matmul per class present in it; activations a_k are
never materialised.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spurguard.server.engine.components import ClassComponents
from spurguard.server.engine.npca import as_index_vector, as_matrix, group_rows
from spurguard.server.errors import FailedPrecondition, InvalidInput

ClassIndex = int | Sequence[int] | np.ndarray | torch.Tensor | None


@dataclass(frozen=True)
class ClassProjection:
    """alpha = features @ directions.T - offsets, for some components of one class."""

    directions: torch.Tensor  # [L, d]: (w_k * v_l) <1, v_l>
    offsets: torch.Tensor  # [L]: <m_k, v_l> <1, v_l>

    def alphas(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.directions.T - self.offsets


def class_projection(
    components: ClassComponents,
    weight_row: torch.Tensor | np.ndarray,
    *,
    rows: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ClassProjection:
    """The projection of a class's components (all, or the listed `rows`), built in float64."""
    vectors = components.vectors if rows is None else components.vectors[list(rows)]
    return linear_projection(vectors, vectors.sum(axis=1), components.mean, weight_row, dtype=dtype, device=device)


def linear_projection(
    basis: np.ndarray,
    scales: np.ndarray,
    mean: np.ndarray,
    weight_row: torch.Tensor | np.ndarray,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ClassProjection:
    """alpha_l = <a - m, basis_l> * scales_l with a = w * phi, as features @ U.T - offsets (float64 built).

    A fit's components have basis = the eigenvectors and scales = <1, v_l>; transferred
    directions have the least-squares dual basis and scales = <1, d_l> (engine.transfer).
    """
    w = torch.as_tensor(weight_row).detach().to(device="cpu", dtype=torch.float64).numpy()
    directions = basis * w[None, :] * scales[:, None]
    offsets = (basis @ mean) * scales
    return ClassProjection(
        torch.as_tensor(directions, dtype=dtype, device=device),
        torch.as_tensor(offsets, dtype=dtype, device=device),
    )


def fit_alphas(
    components: ClassComponents,
    weight_row: torch.Tensor | np.ndarray,
    features: torch.Tensor | np.ndarray,
) -> np.ndarray:
    """Alphas [n, L] (float32, computed in float64) of a class's fit images, for ClassComponents.alphas."""
    x = as_matrix(features, "features", cols=components.mean.shape[0], dtype=torch.float64)
    projection = class_projection(components, weight_row, dtype=torch.float64, device=x.device)
    return projection.alphas(x).cpu().numpy().astype(np.float32)


def as_class_index(
    class_index: int | Sequence[int] | np.ndarray | torch.Tensor,
    rows: int,
    num_classes: int,
    device: torch.device,
) -> torch.Tensor:
    """One class for every image (an int) or one per image, as an int64 vector [rows]."""
    if isinstance(class_index, (int, np.integer)):
        class_index = [int(class_index)] * rows
    return as_index_vector(class_index, "class_index", length=rows, upper=num_classes, device=device)


def resolve_class_index(class_index: ClassIndex, logits: torch.Tensor) -> torch.Tensor:
    """The analysed class per image: the top-1 prediction unless the caller names one."""
    if class_index is None:
        return logits.argmax(dim=1)
    return as_class_index(class_index, logits.shape[0], logits.shape[1], logits.device)


def as_logits(
    logits: torch.Tensor | np.ndarray, rows: int, num_classes: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Caller-supplied logits [N, C], checked against the batch and the head."""
    t = as_matrix(logits, "logits", cols=num_classes, dtype=dtype, device=device)
    if t.shape[0] != rows:
        raise InvalidInput(f"logits have {t.shape[0]} rows for {rows} images")
    return t


@dataclass(frozen=True)
class Decomposition:
    """Per image, for its analysed class k: logit_k = bias_term + alphas.sum(1) + residual.

    `alphas` is [N, L_max] over the fitted classes; a class with fewer components (a
    rank-deficient fit) has zeros in the extra columns, which leaves the sum unchanged.
    """

    class_index: torch.Tensor  # [N] int64
    logits: torch.Tensor  # [N, C] all logits (for predictions)
    logit: torch.Tensor  # [N] logit of the analysed class
    bias_term: torch.Tensor  # [N] b_k + <1, m_k>
    alphas: torch.Tensor  # [N, L_max]
    residual: torch.Tensor  # [N] the part outside the kept components


class Decomposer:
    """Scores batches of features against a head and its fitted classes' components."""

    def __init__(
        self,
        components: Mapping[int, ClassComponents],
        weight: torch.Tensor | np.ndarray,
        bias: torch.Tensor | np.ndarray,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        weight64 = as_matrix(weight, "weight", dtype=torch.float64, device="cpu")
        num_classes, dim = weight64.shape
        bias64 = torch.as_tensor(bias).detach().to(device="cpu", dtype=torch.float64)
        if bias64.shape != (num_classes,):
            raise InvalidInput(f"bias must have shape ({num_classes},), got {tuple(bias64.shape)}")
        check_components(components, num_classes, dim)
        self.dtype = dtype
        self.weight = weight64.to(dtype=dtype, device=device)
        self.bias = bias64.to(dtype=dtype, device=device)
        self.device = self.weight.device
        self._projections = {
            k: class_projection(c, weight64[k], dtype=dtype, device=self.device)
            for k, c in components.items()
        }
        bias_terms = bias64.clone()
        for k, c in components.items():
            bias_terms[k] += float(c.mean.sum())
        self._bias_terms = bias_terms.to(dtype=dtype, device=self.device)
        self.max_components = max((c.num_components for c in components.values()), default=0)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def fitted_classes(self) -> list[int]:
        return sorted(self._projections)

    def features(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Features [N, d] as this decomposer's dtype and device."""
        return as_matrix(features, "features", cols=self.dim, dtype=self.dtype, device=self.device)

    def logits(self, features: torch.Tensor | np.ndarray) -> torch.Tensor:
        """W phi + b, [N, C]."""
        return torch.addmm(self.bias, self.features(features), self.weight.T)

    def alphas(
        self,
        features: torch.Tensor | np.ndarray,
        class_index: int | Sequence[int] | np.ndarray | torch.Tensor,
    ) -> torch.Tensor:
        """Alphas [N, L_max] of each image for its class (an int for all, or one per image)."""
        x = self.features(features)
        return self._alphas(x, as_class_index(class_index, x.shape[0], self.num_classes, self.device))

    def decompose(
        self,
        features: torch.Tensor | np.ndarray,
        class_index: ClassIndex = None,
        logits: torch.Tensor | np.ndarray | None = None,
    ) -> Decomposition:
        """Decompose each image's logit of its class (default: its top-1 prediction)."""
        x = self.features(features)
        if logits is None:
            full = torch.addmm(self.bias, x, self.weight.T)
        else:
            full = as_logits(logits, x.shape[0], self.num_classes, self.dtype, self.device)
        index = resolve_class_index(class_index, full)
        alphas = self._alphas(x, index)
        logit = full.gather(1, index[:, None]).squeeze(1)
        bias_term = self._bias_terms[index]
        return Decomposition(index, full, logit, bias_term, alphas, logit - bias_term - alphas.sum(dim=1))

    def _alphas(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.max_components)
        for k, rows in group_rows(index):
            projection = self._projections.get(k)
            if projection is None:
                raise FailedPrecondition(f"class {k} has no fitted components")
            out[rows, : projection.offsets.shape[0]] = projection.alphas(x[rows])
        return out


def check_components(components: Mapping[int, ClassComponents], num_classes: int, dim: int) -> None:
    """Components must belong to the head they are used with: keys, class range and dim agree."""
    for k, c in components.items():
        if c.class_index != k:
            raise InvalidInput(f"components keyed {k} belong to class {c.class_index}")
        if not 0 <= k < num_classes:
            raise InvalidInput(f"class {k} out of range [0, {num_classes})")
        if c.mean.shape != (dim,) or c.vectors.ndim != 2 or c.vectors.shape[1] != dim:
            raise InvalidInput(
                f"class {k} components have dim {c.mean.shape} / {c.vectors.shape}, head has d={dim}"
            )
