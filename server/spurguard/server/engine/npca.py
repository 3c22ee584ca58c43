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

from typing import Literal

import numpy as np
import torch

from spurguard.server.engine.components import ClassComponents
from spurguard.server.engine.workspace import WORKSPACE
from spurguard.server.errors import FailedPrecondition, InvalidInput

DEFAULT_NUM_COMPONENTS = 50

EigenMethod = Literal["auto", "lanczos", "dense"]

# Measured on 2 cores (d=2048, L=50, n=1300, so the Gram matrix is 1300 x 1300): block Lanczos
# 45-50 ms there, a full eigh 145 ms there and about 0.7 s at 2048 x 2048. Below 512 everything
# takes milliseconds, and once L is a sizeable fraction of the matrix the Krylov space approaches
# its size, so the dense eigh is the safe choice in both cases.
_LANCZOS_MIN_DIM = 512
_LANCZOS_MAX_FRACTION = 1 / 16
# Block size: eigenvalues repeated up to 16 times resolve. Larger blocks need fewer products but a
# larger Krylov space, and each product of a thin block is bound by reading the matrix, so the
# cost is about the number of steps: top-50 of 1300 x 1300 (a 1% gap at 50) took 34 ms at 16,
# 49 ms at 32, 98 ms at 64.
_BLOCK = 16
# The Gram matrix is formed in row slabs below the diagonal (half the GEMM work of A A^T, and
# exactly symmetric): 4 slabs took 30 ms where one GEMM took 40 at 1300 x 2048.
_GRAM_SLABS = 4
# Converged when the Lanczos residual estimate ||M u - theta u|| <= _CONVERGED_TOL * theta_1 for
# every Ritz pair (float64 rounding floors it near 1e-14); the pairs are kept only if their
# true residuals and orthonormality are within _VERIFY_TOL, else the dense solver takes over.
_CONVERGED_TOL = 1e-12
_VERIFY_TOL = 1e-10
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


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in x. A sum with any NaN or infinity in it is not finite, so a finite
    sum proves every entry finite; a sum in x's own dtype costs a seventh of a float64 one, and
    far less than isfinite's pass and mask. Only a non-finite sum (a NaN, an infinity, or large
    finite values overflowing) pays for the exact elementwise check."""
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def group_rows(class_index: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(class, row indices) for each class in a batch, so work is one op per class, not per image."""
    order = torch.argsort(class_index, stable=True)
    classes, counts = torch.unique_consecutive(class_index[order], return_counts=True)
    return list(zip(classes.tolist(), torch.split(order, counts.tolist())))


def _select(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] for ascending row indices, as a view when they are one run (a batch of one class,
    the usual case in a folder read class by class): gathering a copy took a tenth of an update."""
    first, last = int(rows[0]), int(rows[-1])
    return x[first : last + 1] if last - first + 1 == rows.shape[0] else x[rows]


class ClassStatistics:
    """One class's images as count, mean and centered scatter sum_i (x_i - mean)(x_i - mean)^T.

    While a class has at most `max_rows` images (default d) it keeps the rows themselves
    instead of the scatter: that is no more memory (max_rows x d floats, the scatter's d x d),
    it makes each update a copy instead of a rank-n GEMM, and it lets finalize solve the n x n
    Gram problem, far cheaper than the d x d one when n < d. The first batch past max_rows
    turns the rows into the scatter for good. Everything is float64; `update` and `merge` use
    Chan et al.'s pairwise formula, so any split of the data into batches or partial fits
    yields the same statistics up to float64 rounding.
    """

    def __init__(
        self, dim: int, device: torch.device | str | None = None, *, max_rows: int | None = None
    ) -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.max_rows = dim if max_rows is None else max_rows
        self._rows: torch.Tensor | None = None  # [max_rows, d]; the first `count` rows are data
        self._scatter: torch.Tensor | None = None  # [d, d] once the class outgrew max_rows

    @classmethod
    def empty(cls, dim: int, device: torch.device | str | None = None) -> ClassStatistics:
        return cls(dim, device)

    @classmethod
    def from_scatter(
        cls, count: int, mean: torch.Tensor | np.ndarray, scatter: torch.Tensor | np.ndarray
    ) -> ClassStatistics:
        """Statistics kept as (count, mean, scatter), such as a partial fit read back from files;
        merging them is Chan's formula, as for statistics built in this process."""
        scatter = as_matrix(scatter, "scatter", dtype=torch.float64)
        dim = int(scatter.shape[0])
        mean = _tensor(mean, "mean").to(dtype=torch.float64, device=scatter.device)
        if scatter.shape != (dim, dim) or mean.shape != (dim,) or count < 1:
            raise InvalidInput(
                f"statistics need count >= 1, a [d] mean and a [d, d] scatter; got {count}, "
                f"{tuple(mean.shape)}, {tuple(scatter.shape)}"
            )
        stats = cls(dim, scatter.device)
        stats.count, stats.mean, stats._scatter = int(count), mean.clone(), scatter.clone()
        return stats

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def rows(self) -> torch.Tensor | None:
        """The class's rows [count, d] while it keeps them, else None (it keeps the scatter)."""
        return None if self._scatter is not None else self._buffer()[: self.count]

    @property
    def scatter(self) -> torch.Tensor:
        """The centered scatter [d, d] (computed from the rows while the class keeps them)."""
        if self._scatter is not None:
            return self._scatter
        centered = self._buffer()[: self.count] - self.mean
        return centered.T @ centered

    def update(self, rows: torch.Tensor) -> None:
        """Absorb a batch [n, d] of this class (any float dtype; accumulated in float64)."""
        n = int(rows.shape[0])
        if n == 0:
            return
        if self._scatter is None and self.count + n <= self.max_rows:
            kept = self._buffer()[self.count : self.count + n]
            kept.copy_(rows)
            self._absorb(n, kept.mean(dim=0))
            return
        x = rows.to(dtype=torch.float64, device=self.device)
        batch_mean = x.mean(dim=0)
        centered = x - batch_mean
        self._to_scatter().addmm_(centered.T, centered)
        self._absorb(n, batch_mean)

    def merge(self, other: ClassStatistics) -> None:
        """Absorb another partial fit of the same class (in place)."""
        if other.dim != self.dim:
            raise InvalidInput(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return
        if other._scatter is None:
            self.update(other._buffer()[: other.count])  # exactly Chan's merge of its rows
            return
        self._to_scatter().add_(other._scatter.to(self.device))
        self._absorb(other.count, other.mean.to(self.device))

    def to(self, device: torch.device | str) -> ClassStatistics:
        """The same statistics on `device` (self when already there)."""
        if torch.device(device) == self.device:
            return self
        moved = ClassStatistics(self.dim, device, max_rows=self.max_rows)
        moved.merge(self)
        return moved

    def _buffer(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = WORKSPACE.take((self.max_rows, self.dim), torch.float64, self.device)
        return self._rows

    def _to_scatter(self) -> torch.Tensor:
        """Switch from rows to the scatter (once) and return it."""
        if self._scatter is None:
            self._scatter = self.scatter
            self._rows = None
        return self._scatter

    def _absorb(self, n_b: int, mean_b: torch.Tensor) -> None:
        """Chan's cross term and mean shift, once the other part's own scatter (or rows) is in."""
        n = self.count + n_b
        delta = mean_b - self.mean
        if self._scatter is not None:
            self._scatter.addr_(delta, delta, alpha=self.count * n_b / n)
        self.mean.add_(delta, alpha=n_b / n)
        self.count = n

    def take_weighted_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept rows, centered and weighted in place: (x_i - mean) * weight, [count, d].

        In place because finalize is the rows' last use: a copy at d = 2048 and 1300 rows costs
        a fortieth of the whole solve. Only count and mean are left afterwards; the caller hands
        the rows to `WORKSPACE.give` once it is done with them."""
        rows = self.rows
        if rows is None:
            raise FailedPrecondition("the class keeps its scatter, not its rows")
        w = weight.to(dtype=torch.float64, device=self.device)
        self._rows = None  # spent: count and mean stay, the rows are A now
        return rows.sub_(self.mean).mul_(w)

    def covariance(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Covariance of x (or of weight * x) with n - 1 normalisation (np.cov); zero below two images.

        Built with one d x d allocation and in-place scaling: at d = 2048 each extra temporary
        costs as much as a tenth of the eigensolver.
        """
        scatter = self.scatter
        cov = scatter + scatter.T  # GEMM output is symmetric only up to rounding
        scale = 0.5 / max(self.count - 1, 1)
        if weight is None:
            return cov.mul_(scale)
        w = weight.to(dtype=torch.float64, device=cov.device)
        return cov.mul_(w[:, None]).mul_(w[None, :] * scale)


def top_eigenpairs(
    cov: np.ndarray | torch.Tensor, num: int, *, method: EigenMethod = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Largest `num` eigenpairs of a symmetric PSD matrix: (values [L] descending, vectors [L, d]).

    Numerically-zero eigenvalues are dropped (so L may be < num), and each eigenvector's sign is
    fixed so that <1, v> >= 0 (ties: first nonzero entry positive), making fits reproducible.
    The solve runs on the tensor's device; see `_eigenpairs` for the methods.
    """
    matrix = torch.as_tensor(cov).to(torch.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise InvalidInput(f"covariance must be square, got shape {tuple(matrix.shape)}")
    values, vectors = _eigenpairs(matrix, num, method, rank_dim=matrix.shape[0])
    return values.cpu().numpy(), _fix_signs(vectors.T.cpu().numpy())


def _eigenpairs(
    matrix: torch.Tensor, num: int, method: EigenMethod, *, rank_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpairs (values descending, vectors as columns) without the numerically-zero ones.

    `auto` uses block Lanczos when num is a small fraction of a large matrix, a dense eigh
    otherwise; Lanczos falls back to it when it does not converge. `rank_dim` is the
    feature dimension d, which sets the zero threshold lambda_1 * d * 8 eps whichever of the
    d x d covariance or the n x n Gram matrix is solved, so both keep the same components.
    """
    m = matrix.shape[0]
    num = min(int(num), m)
    if num <= 0:
        return matrix.new_zeros(0), matrix.new_zeros(m, 0)
    if method == "auto":
        lanczos = m >= _LANCZOS_MIN_DIM and num <= m * _LANCZOS_MAX_FRACTION
        method = "lanczos" if lanczos else "dense"
    found = _block_lanczos(matrix, num) if method == "lanczos" and num < m else None
    values, vectors = found if found is not None else _dense(matrix, num)
    keep = values > max(float(values[0]), 0.0) * rank_dim * _RANK_TOL_EPS
    return values[keep], vectors[:, keep]


def _dense(matrix: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `num` of a full eigh, descending, on the matrix's device.

    torch's, not scipy's subset solver (faster on one core): on the CPU the two libraries' thread
    pools spin against each other when calls alternate, costing more than either solver.
    """
    values, vectors = torch.linalg.eigh(matrix)
    return values[-num:].flip(0), vectors[:, -num:].flip(1)


def _block_lanczos(matrix: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Block Lanczos with full reorthogonalisation, from a fixed random start (determinism).

    Why: a dense solve is bound by its BLAS-2 tridiagonal reduction, while this needs about ten block products of the matrix
    (GEMMs, on the matrix's device) and a few small eigh of the projected matrix. It stops when
    the Lanczos residual estimate of every Ritz pair is below _CONVERGED_TOL * theta_1 and
    returns only what `_verified` confirms on the matrix itself; None (the caller solves densely)
    when it does not converge before the Krylov space would pass half the matrix.
    """
    m = matrix.shape[0]
    block, limit = _BLOCK, m // 2
    first_check = max(3 * block, 2 * num)
    if first_check > limit:
        return None
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    start = torch.randn(m, block, generator=generator, dtype=matrix.dtype, device=matrix.device)
    # The basis vectors are rows, so the Krylov basis K^T is a contiguous slab: GEMMs on it ran
    # twice as fast as on the equivalent column slices.
    basis = WORKSPACE.take((limit + block, m), matrix.dtype, matrix.device)
    projected = WORKSPACE.take((limit + block, limit + block), matrix.dtype, matrix.device).zero_()  # K^T matrix K
    try:
        return _lanczos_steps(matrix, num, start, basis, projected, first_check, limit)
    finally:  # what it returns are new tensors: neither buffer is read afterwards
        WORKSPACE.give(basis)
        WORKSPACE.give(projected)


def _lanczos_steps(
    matrix: torch.Tensor, num: int, start: torch.Tensor, basis: torch.Tensor, projected: torch.Tensor,
    first_check: int, limit: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`_block_lanczos`'s iteration, in its work buffers."""
    block = start.shape[1]
    basis[:block] = torch.linalg.qr(start).Q.T
    size, next_check, history = block, first_check, []
    while True:
        krylov_t = basis[:size]
        z = matrix @ basis[size - block : size].T
        # The three-term step against the last two blocks (the only nonzero blocks of K^T M q
        # in exact arithmetic: the projected matrix is block tridiagonal), then one full pass
        # against the whole basis for what rounding left: twice is enough, and the first
        # pass needs only the two blocks that hold almost all of z.
        recent = basis[max(size - 2 * block, 0) : size]
        h = recent @ z
        projected[size - recent.shape[0] : size, size - block : size] = h
        projected[size - block : size, size - recent.shape[0] : size] = h.T
        z -= recent.T @ h
        z -= krylov_t.T @ (krylov_t @ z)
        q, r = torch.linalg.qr(z)
        last = size + block > limit
        if size >= next_check or last:
            values, ritz = _dense(projected[:size, :size], num)
            scale = max(float(values[0]), np.finfo(np.float64).tiny)
            estimate = float((r @ ritz[size - block :]).norm(dim=0).max()) / scale
            if estimate <= _CONVERGED_TOL:
                return _verified(matrix, values, krylov_t.T @ ritz)
            if last:
                return None
            history.append((size, estimate))
            next_check = _next_check(history, block)
        basis[size : size + block] = q.T
        size += block


def _next_check(history: list[tuple[int, float]], block: int) -> int:
    """Krylov size at which to test convergence next.

    Each test costs an eigh of the projected matrix, so tests are spaced out: half-way to where
    the geometric decay of the last two estimates reaches the tolerance (Krylov convergence
    speeds up as it goes, so the full extrapolation overshoots by several blocks).
    """
    size, estimate = history[-1]
    if len(history) < 2 or estimate >= history[-2][1]:
        return size + 2 * block
    rate = np.log(estimate / history[-2][1]) / (size - history[-2][0])
    half_way = np.log(_CONVERGED_TOL / estimate) / rate / 2
    return size + block * max(1, int(np.ceil(half_way / block)))


def _verified(
    matrix: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The Ritz pairs when their true residuals and orthonormality hold up, else None."""
    scale = max(float(values[0]), np.finfo(np.float64).tiny)
    residual = float((matrix @ vectors - vectors * values).norm(dim=0).max()) / scale
    eye = torch.eye(vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    orthonormal = float((vectors.T @ vectors - eye).abs().max())
    return (values, vectors) if max(residual, orthonormal) <= _VERIFY_TOL else None


def _gram(a: torch.Tensor) -> torch.Tensor:
    """A A^T from `_GRAM_SLABS` row slabs, each multiplied only with the rows up to its own end."""
    n = a.shape[0]
    gram = WORKSPACE.take((n, n), a.dtype, a.device)  # the caller gives it back
    cuts = np.linspace(0, n, _GRAM_SLABS + 1).astype(int).tolist()
    for start, stop in zip(cuts, cuts[1:]):
        slab = a[start:stop] @ a[:stop].T
        gram[start:stop, :stop] = slab
        gram[:start, start:stop] = slab[:, :start].T
    return gram


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
        if not _all_finite(x):
            raise InvalidInput("features contain NaN or infinity")
        if x.shape[0] == 0:
            return
        for k, rows in group_rows(y):
            if k not in self._stats:
                self._stats[k] = ClassStatistics.empty(self.dim, self.device)
            self._stats[k].update(_select(x, rows))

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
                self._stats[k] = stats.to(self.device)
        other._stats = {}

    def merge_class(self, class_index: int, stats: ClassStatistics) -> None:
        """Absorb one class's partial statistics (another worker's, or read back from files)."""
        if not 0 <= class_index < self.num_classes:
            raise InvalidInput(f"class {class_index} out of range [0, {self.num_classes})")
        self._stats.setdefault(class_index, ClassStatistics.empty(self.dim, self.device)).merge(stats)

    def take_class(self, class_index: int) -> ClassStatistics:
        """Remove and return a class's open statistics, so that another process can merge them."""
        stats = self.statistics(class_index)
        del self._stats[class_index]
        return stats

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
        """Top components of class k's weighted activations; frees the class's statistics.

        A class that kept its n <= d rows is solved through its n x n Gram matrix G = A A^T of
        the centered weighted rows A: A^T A / (n - 1) is the covariance, G has the same nonzero
        eigenvalues, and v = A^T u / sqrt(lambda_G) maps G's eigenvectors u onto its own.
        """
        if num_components < 1:
            raise InvalidInput(f"num_components must be >= 1, got {num_components}")
        stats = self.statistics(class_index)
        w = self.weight[class_index]
        num = min(num_components, stats.count - 1)
        scale = 1.0 / max(stats.count - 1, 1)
        if stats.rows is not None:
            a = stats.take_weighted_rows(w)
            gram = _gram(a)
            values, u = _eigenpairs(gram, num, method, rank_dim=self.dim)
            total_variance = float(torch.diagonal(gram).sum()) * scale
            WORKSPACE.give(gram)
            vectors = (a.T @ u).div_(values.sqrt())
            WORKSPACE.give(a)
            values = values * scale
        else:
            cov = stats.covariance(w)
            values, vectors = _eigenpairs(cov, num, method, rank_dim=self.dim)
            total_variance = float(torch.diagonal(cov).sum())
        components = ClassComponents(
            class_index=class_index,
            count=stats.count,
            mean=(w * stats.mean).cpu().numpy(),
            eigenvalues=values.cpu().numpy(),
            vectors=_fix_signs(vectors.T.cpu().numpy()),
            total_variance=total_variance,
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
