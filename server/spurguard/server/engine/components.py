"""What a neural PCA fit keeps for one class: the record the store persists and scoring uses."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_FLOOR_PERCENTILE = 5.0


def alpha_floor(alphas: np.ndarray, columns: int, percentile: float = DEFAULT_FLOOR_PERCENTILE) -> np.ndarray:
    """The q-th percentile of each column of per-image contributions [n, columns] (zeros for no images):
    SpuFix's floor, for a fit's components and for transferred directions alike."""
    if alphas.shape[0] == 0:
        return np.zeros(columns)
    return np.percentile(alphas.astype(np.float64), percentile, axis=0)


@dataclass
class ClassComponents:
    """Top-L neural PCA components of class k's weighted activations a_k = w_k * phi(x).

    Vectors are rows (component index 0 = largest eigenvalue). The fit-image fields hold, per
    image of the class in the fit dataset, its id (path relative to the dataset root) and its
    alphas; the alpha statistics (floor, max) are derived from them.
    """

    class_index: int
    count: int
    mean: np.ndarray  # m_k, [d] float64
    eigenvalues: np.ndarray  # [L] float64, descending
    vectors: np.ndarray  # [L, d] float64, orthonormal rows
    total_variance: float  # trace of the class covariance
    image_ids: list[str] = field(default_factory=list)
    alphas: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [n_k, L]

    @property
    def num_components(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def explained_variance(self) -> np.ndarray:
        """Share of the class's total variance each component carries."""
        if self.total_variance <= 0:
            return np.zeros_like(self.eigenvalues)
        return self.eigenvalues / self.total_variance

    def alpha_floor(self, percentile: float = DEFAULT_FLOOR_PERCENTILE) -> np.ndarray:
        """f_l: the q-th percentile of alpha_l over the fit images (the level with the feature absent)."""
        return alpha_floor(self.alphas, self.num_components, percentile)

    @property
    def alpha_mean(self) -> np.ndarray:
        if self.alphas.shape[0] == 0:
            return np.zeros(self.num_components)
        return self.alphas.astype(np.float64).mean(axis=0)

    @property
    def alpha_max(self) -> np.ndarray:
        if self.alphas.shape[0] == 0:
            return np.zeros(self.num_components)
        return self.alphas.astype(np.float64).max(axis=0)
