"""Class-wise neural PCA: streaming, mergeable per-class statistics and their top-L eigenpairs.

Why this shape: fitting is one pass over a dataset that never fits in memory, possibly split
over workers. Each class keeps only (count, mean, centered scatter) in float64, updated per
batch and merged with Chan et al.'s parallel formula, so memory is O(d^2) per open class and
independent of the number of images; a class's d x d scatter is freed as soon as it is
finalized.

The statistics are of the backbone features phi(x), not of the weighted activations
a_k = w_k * phi(x): weighting is linear, so Cov(a_k) = diag(w_k) Cov_k(phi) diag(w_k) exactly,
and applying it once at finalize spares an N x d multiply per batch and keeps the statistics
themselves head-independent.

Covariance normalisation is n - 1 (as np.cov). A class with n_k images has a covariance of rank
at most n_k - 1, so a fit keeps min(L, n_k - 1) components and additionally drops eigenvalues
that are numerically zero (below lambda_1 * d * 8 eps): their eigenvectors are arbitrary
directions of a null space and would make alphas meaningless. A class with one image therefore
has no components (its logit is bias_term + residual).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
import scipy.sparse.linalg
import torch

from spurguard.server.engine.components import ClassComponents
from spurguard.server.errors import FailedPrecondition, InvalidInput

DEFAULT_NUM_COMPONENTS = 50

EigenMethod = Literal["auto", "lanczos", "dense"]

# Measured on 2 cores (d=2048, n=1300, L=50): ARPACK Lanczos 0.12-0.25 s (with its residual
# check), LAPACK subset (syevr) 0.30 s, full eigh 0.72-0.80 s. Lanczos loses once L is a sizeable fraction of d (L=200 at d=2048:
# 3.1 s vs 0.45 s) and below d=512 everything takes milliseconds, so LAPACK is the safe choice.
_LANCZOS_MIN_DIM = 512
_LANCZOS_MAX_FRACTION = 1 / 16
# A Ritz pair is accepted when ||C v - lambda v|| <= tol * lambda_1; ARPACK at tol=0 reaches
# ~1e-14, so anything worse means it did not converge and the dense solver takes over.
_RESIDUAL_TOL = 1e-8
_RANK_TOL_EPS = 8 * np.finfo(np.float64).eps


def _tensor(x: object, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInput(f"{name} is not a numeric array: {exc}") from None


def as_matrix(
    x: torch.Tensor | np.ndarray,
    name: str,
    *,
    cols: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A 2-D tensor from numpy or torch; a wrong shape is the caller's mistake (InvalidInput)."""
    t = _tensor(x, name)
    if t.ndim != 2:
        raise InvalidInput(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if cols is not None and t.shape[1] != cols:
        raise InvalidInput(f"{name} must have {cols} columns, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InvalidInput(f"{name} must be floating point, got {t.dtype}")
    return t.to(dtype=dtype, device=device)


def as_index_vector(
    x: torch.Tensor | np.ndarray | list[int],
    name: str,
    *,
    length: int,
    upper: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """An int64 vector of `length` entries in [0, upper): labels and class indices of a batch."""
    t = _tensor(x, name).to(device)
    if t.ndim != 1 or t.shape[0] != length:
        raise InvalidInput(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InvalidInput(f"{name} must be integers, got {t.dtype}")
    t = t.to(torch.int64)
    if length and (int(t.min()) < 0 or int(t.max()) >= upper):
        raise InvalidInput(f"{name} must lie in [0, {upper}), got [{int(t.min())}, {int(t.max())}]")
    return t


def group_rows(class_index: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(class, row indices) for each class in a batch, so work is one op per class, not per image."""
    order = torch.argsort(class_index, stable=True)
    classes, counts = torch.unique_consecutive(class_index[order], return_counts=True)
    return list(zip(classes.tolist(), torch.split(order, counts.tolist())))


@dataclass
class ClassStatistics:
    """Count, mean and centered scatter sum_i (x_i - mean)(x_i - mean)^T of one class, float64.

    `update` and `merge` use Chan et al.'s pairwise formula, so any split of the data into
    batches or partial fits yields the same statistics up to float64 rounding.
    """

    count: int
    mean: torch.Tensor  # [d] float64
    scatter: torch.Tensor  # [d, d] float64

    @classmethod
    def empty(cls, dim: int, device: torch.device | str | None = None) -> ClassStatistics:
        return cls(
            0,
            torch.zeros(dim, dtype=torch.float64, device=device),
            torch.zeros(dim, dim, dtype=torch.float64, device=device),
        )

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def update(self, rows: torch.Tensor) -> None:
        """Absorb a batch [n, d] of this class (any float dtype; accumulated in float64)."""
        x = rows.to(dtype=torch.float64, device=self.mean.device)
        if x.shape[0] == 0:
            return
        batch_mean = x.mean(dim=0)
        centered = x - batch_mean
        self.scatter.addmm_(centered.T, centered)
        self._absorb(x.shape[0], batch_mean)

    def merge(self, other: ClassStatistics) -> None:
        """Absorb another partial fit of the same class (in place)."""
        if other.dim != self.dim:
            raise InvalidInput(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return
        self.scatter.add_(other.scatter.to(self.scatter.device))
        self._absorb(other.count, other.mean.to(self.mean.device))

    def _absorb(self, n_b: int, mean_b: torch.Tensor) -> None:
        """Chan's cross term and mean shift, once the other part's own scatter is added."""
        n = self.count + n_b
        delta = mean_b - self.mean
        self.scatter.addr_(delta, delta, alpha=self.count * n_b / n)
        self.mean.add_(delta, alpha=n_b / n)
        self.count = n

    def covariance(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Covariance of x (or of weight * x) with n - 1 normalisation (np.cov); zero below two images.

        Built with one d x d allocation and in-place scaling: at d = 2048 each extra temporary
        costs as much as a tenth of the eigensolver.
        """
        cov = self.scatter + self.scatter.T  # GEMM output is symmetric only up to rounding
        scale = 0.5 / max(self.count - 1, 1)
        if weight is None:
            return cov.mul_(scale)
        w = weight.to(dtype=torch.float64, device=cov.device)
        return cov.mul_(w[:, None]).mul_(w[None, :] * scale)


def top_eigenpairs(
    cov: np.ndarray, num: int, *, method: EigenMethod = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Largest `num` eigenpairs of a symmetric PSD matrix: (values [L] descending, vectors [L, d]).

    Numerically-zero eigenvalues are dropped (so L may be < num), and each eigenvector's sign is
    fixed so that <1, v> >= 0 (ties: first nonzero entry positive), making fits reproducible.
    `auto` uses ARPACK Lanczos when num is a small fraction of a large d (3-6x faster than a
    full eigh at d=2048, L=50), LAPACK's subset solver otherwise.
    """
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise InvalidInput(f"covariance must be square, got shape {cov.shape}")
    d = cov.shape[0]
    num = min(int(num), d)
    if num <= 0:
        return np.zeros(0), np.zeros((0, d))
    if method == "auto":
        lanczos = d >= _LANCZOS_MIN_DIM and num <= d * _LANCZOS_MAX_FRACTION
        method = "lanczos" if lanczos else "dense"
    values, vectors = None, None
    if method == "lanczos" and num < d:
        values, vectors = _lanczos(cov, num)
    if values is None:
        values, vectors = scipy.linalg.eigh(cov, subset_by_index=[d - num, d - 1])
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order].T.copy()
    keep = values > max(values[0], 0.0) * d * _RANK_TOL_EPS
    values, vectors = values[keep], vectors[keep]
    return values, _fix_signs(vectors)


def _lanczos(cov: np.ndarray, num: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """ARPACK with a fixed start vector (determinism); (None, None) when it does not converge."""
    start = np.random.default_rng(0).standard_normal(cov.shape[0])
    try:
        values, vectors = scipy.sparse.linalg.eigsh(cov, k=num, which="LA", v0=start, tol=0)
    except (scipy.sparse.linalg.ArpackNoConvergence, scipy.sparse.linalg.ArpackError):
        return None, None
    scale = max(float(np.max(values)), np.finfo(np.float64).tiny)
    residual = np.linalg.norm(cov @ vectors - vectors * values, axis=0)
    if np.max(residual) > _RESIDUAL_TOL * scale:
        return None, None
    return values, vectors


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip rows so that <1, v> > 0, or the first nonzero entry is positive when <1, v> == 0."""
    sums = vectors.sum(axis=1)
    first = vectors[np.arange(len(vectors)), np.argmax(vectors != 0, axis=1)]
    signs = np.where(sums != 0, np.sign(sums), np.sign(first))
    return vectors * np.where(signs == 0, 1.0, signs)[:, None]


class NeuralPCAFit:
    """A running class-wise neural PCA fit against a head weight W [C, d].

    Feed batches with `update`, combine workers with `merge`, and `finalize_class` each class as
    soon as all its images are in: that returns its ClassComponents (without fit-image alphas,
    which need a second pass: see decompose.fit_alphas) and frees its d x d scatter.
    """

    def __init__(
        self, weight: torch.Tensor | np.ndarray, *, device: torch.device | str | None = None
    ) -> None:
        self.weight = as_matrix(weight, "weight", dtype=torch.float64, device=device)
        self.device = self.weight.device
        self._stats: dict[int, ClassStatistics] = {}

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def classes_seen(self) -> list[int]:
        """Classes with statistics still open (seen and not yet finalized), ascending."""
        return sorted(self._stats)

    def update(
        self, features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | list[int]
    ) -> None:
        """Absorb a batch of features [N, d] with their class labels [N]."""
        x = as_matrix(features, "features", cols=self.dim, device=self.device)
        y = as_index_vector(labels, "labels", length=x.shape[0], upper=self.num_classes, device=self.device)
        if not bool(torch.isfinite(x).all()):
            raise InvalidInput("features contain NaN or infinity")
        if x.shape[0] == 0:
            return
        for k, rows in group_rows(y):
            if k not in self._stats:
                self._stats[k] = ClassStatistics.empty(self.dim, self.device)
            self._stats[k].update(x[rows])

    def merge(self, other: NeuralPCAFit) -> None:
        """Absorb another partial fit of the same head; `other` is emptied (its scatters move)."""
        if other is self:
            raise InvalidInput("cannot merge a neural PCA fit into itself")
        if other.weight.shape != self.weight.shape or not torch.equal(
            other.weight.to(self.device), self.weight
        ):
            raise InvalidInput("cannot merge neural PCA fits of different heads")
        for k, stats in other._stats.items():
            if k in self._stats:
                self._stats[k].merge(stats)
            else:
                stats.mean, stats.scatter = stats.mean.to(self.device), stats.scatter.to(self.device)
                self._stats[k] = stats
        other._stats = {}

    def count(self, class_index: int) -> int:
        return self.statistics(class_index).count

    def statistics(self, class_index: int) -> ClassStatistics:
        """The open statistics of a class; FailedPrecondition when it has none (unseen/finalized)."""
        if not 0 <= class_index < self.num_classes:
            raise InvalidInput(f"class {class_index} out of range [0, {self.num_classes})")
        if class_index not in self._stats:
            raise FailedPrecondition(
                f"class {class_index} has no images in this fit (never seen or already finalized)"
            )
        return self._stats[class_index]

    def finalize_class(
        self,
        class_index: int,
        num_components: int = DEFAULT_NUM_COMPONENTS,
        *,
        method: EigenMethod = "auto",
    ) -> ClassComponents:
        """Top components of class k's weighted activations; frees the class's statistics."""
        if num_components < 1:
            raise InvalidInput(f"num_components must be >= 1, got {num_components}")
        stats = self.statistics(class_index)
        w = self.weight[class_index]
        cov = stats.covariance(w)
        values, vectors = top_eigenpairs(
            cov.cpu().numpy(), min(num_components, stats.count - 1), method=method
        )
        components = ClassComponents(
            class_index=class_index,
            count=stats.count,
            mean=(w * stats.mean).cpu().numpy(),
            eigenvalues=values,
            vectors=vectors,
            total_variance=float(torch.diagonal(cov).sum()),
        )
        del self._stats[class_index]
        return components


def fit_components(
    weight: torch.Tensor | np.ndarray,
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | list[int],
    num_components: int = DEFAULT_NUM_COMPONENTS,
    *,
    method: EigenMethod = "auto",
) -> dict[int, ClassComponents]:
    """One-shot fit of every class present in in-memory features (tests, benchmarks)."""
    fit = NeuralPCAFit(weight)
    fit.update(features, labels)
    return {k: fit.finalize_class(k, num_components, method=method) for k in fit.classes_seen}
