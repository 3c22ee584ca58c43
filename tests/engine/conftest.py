"""Seeded synthetic heads and features, and an independent float64 neural PCA reference.

Features are post-ReLU-like (non-negative) with a planted low-rank structure per class whose
factor scales fall geometrically, so the top eigenvalues are well separated; the reference
stores every weighted activation and uses np.cov + np.linalg.eigh, the approach the engine
must reproduce without storing anything.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass(frozen=True)
class Problem:
    features: np.ndarray  # [N, d] float32, >= 0
    labels: np.ndarray  # [N] int64
    weight: np.ndarray  # [C, d] float32
    bias: np.ndarray  # [C] float32

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def class_rows(self, k: int) -> np.ndarray:
        return self.features[self.labels == k]


def make_problem(
    seed: int, num_classes: int, dim: int, per_class: int | list[int], rank: int = 6
) -> Problem:
    rng = np.random.default_rng(seed)
    counts = [per_class] * num_classes if isinstance(per_class, int) else per_class
    features, labels = [], []
    for k, n in enumerate(counts):
        loadings = rng.exponential(1.0, size=(rank, dim))
        scales = 2.0 * 0.6 ** np.arange(rank)
        latent = rng.standard_normal((n, rank)) * scales
        raw = 1.0 + latent @ loadings / np.sqrt(rank) + 0.1 * rng.standard_normal((n, dim))
        features.append(np.maximum(raw, 0.0))
        labels.append(np.full(n, k))
    order = rng.permutation(sum(counts))
    return Problem(
        features=np.concatenate(features)[order].astype(np.float32),
        labels=np.concatenate(labels)[order].astype(np.int64),
        weight=(0.2 * rng.standard_normal((num_classes, dim))).astype(np.float32),
        bias=rng.standard_normal(num_classes).astype(np.float32),
    )


@dataclass(frozen=True)
class Reference:
    """Full float64 eigendecomposition of one class's weighted activations (all components)."""

    activations: np.ndarray  # [n, d]
    mean: np.ndarray
    cov: np.ndarray
    eigenvalues: np.ndarray  # [d] descending
    vectors: np.ndarray  # [d, d] columns

    def alphas(self, features: np.ndarray, weight_row: np.ndarray) -> np.ndarray:
        """alpha_l(x) = <a(x) - m, v_l> <1, v_l> for every component l."""
        a = features.astype(np.float64) * weight_row.astype(np.float64)
        return ((a - self.mean) @ self.vectors) * self.vectors.sum(axis=0)


def reference_pca(problem: Problem, k: int) -> Reference:
    a = problem.class_rows(k).astype(np.float64) * problem.weight[k].astype(np.float64)
    cov = np.atleast_2d(np.cov(a, rowvar=False))
    values, vectors = np.linalg.eigh(cov)
    return Reference(a, a.mean(axis=0), cov, values[::-1], vectors[:, ::-1])


@pytest.fixture(scope="session")
def large_problem() -> Problem:
    """d = 512: large enough for the Lanczos path (L <= d / 16)."""
    return make_problem(seed=1, num_classes=3, dim=512, per_class=300)


@pytest.fixture(scope="session")
def small_problem() -> Problem:
    return make_problem(seed=2, num_classes=4, dim=40, per_class=[120, 90, 150, 60])


@pytest.fixture(scope="session")
def problem_factory():
    """make_problem, for tests that need a problem of their own shape."""
    return make_problem


@pytest.fixture(scope="session")
def ref_pca():
    """reference_pca(problem, k) -> Reference."""
    return reference_pca
