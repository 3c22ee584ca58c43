"""max_cov transfer (SPEC §1) against an independent float64 reference written from the formulas:
directions, contributions (one direction, and least squares for two in one class), floors, and
SpuFix applying transferred directions beside a class's own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spurguard.server.engine import MaxCovAccumulator, SpuFix, TransferredClass, transfer_alphas
from spurguard.server.errors import FailedPrecondition

N, D = 240, 12


def reference(features: np.ndarray, weight_row: np.ndarray, alphas: np.ndarray, queries: np.ndarray):
    """SPEC §1, literally, in float64: a' = w * phi, m' its mean, d_l = normalise(sum alpha_l (a' - m'));
    contributions by least squares onto span(d), each coefficient times <1, d_l>."""
    a = features.astype(np.float64) * weight_row.astype(np.float64)
    m = a.mean(axis=0)
    directions = []
    for l in range(alphas.shape[1]):
        raw = sum(alphas[i, l] * (a[i] - m) for i in range(a.shape[0]))
        directions.append(raw / np.linalg.norm(raw))
    d = np.stack(directions)  # [m, d]
    centred = queries.astype(np.float64) * weight_row - m  # [q, d]
    coefficients, *_ = np.linalg.lstsq(d.T, centred.T, rcond=None)  # [m, q]
    contributions = coefficients.T * d.sum(axis=1)[None, :]
    return d, m, contributions, centred


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    features = np.maximum(rng.standard_normal((N, D)), 0).astype(np.float32)
    weight_row = rng.standard_normal(D).astype(np.float32)
    # source alphas that covary with some target directions, plus noise, centred like real alphas
    alphas = features @ rng.standard_normal((D, 2)).astype(np.float32) + 0.1 * rng.standard_normal((N, 2))
    alphas = (alphas - alphas.mean(axis=0)).astype(np.float32)
    queries = np.maximum(rng.standard_normal((30, D)), 0).astype(np.float32)
    return features, weight_row, alphas, queries


def _accumulate(features, weight_row, alphas, components, batch=37) -> TransferredClass:
    accumulator = MaxCovAccumulator(weight_row, alphas.shape[1])
    for start in range(0, len(features), batch):  # several batches: the sums stream
        accumulator.update(torch.from_numpy(features[start : start + batch]), alphas[start : start + batch])
    return accumulator.finalize(3, components)


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("columns", [[0], [0, 1]], ids=["one direction", "least squares for two"])
def test_directions_and_contributions_equal_the_float64_reference(data, columns) -> None:
    features, weight_row, alphas, queries = data
    source = alphas[:, columns]
    moved = _accumulate(features, weight_row, source, [5, 9][: len(columns)])
    d, m, contributions, centred = reference(features, weight_row, source, queries)
    assert moved.source_components == (5, 9)[: len(columns)] and moved.count == N
    assert _relative(moved.directions, d) <= 1e-6 and _relative(moved.mean, m) <= 1e-6
    assert _relative(transfer_alphas(moved, weight_row, queries).astype(np.float64), contributions) <= 1e-6
    got = moved.projection(weight_row, dtype=torch.float64).alphas(torch.from_numpy(queries).double()).numpy()
    np.testing.assert_allclose(got, contributions, rtol=1e-6, atol=1e-12)
    # the covariance is the one max_cov maximises: cov(alpha_l, <a', d_l>) with n - 1
    projected = (features.astype(np.float64) * weight_row - m) @ d.T
    cov = [np.cov(source[:, l], projected[:, l])[0, 1] for l in range(len(columns))]
    np.testing.assert_allclose(moved.covariance, cov, rtol=1e-6)
    if len(columns) == 2:  # the contributions add up to the contribution of the projection
        coefficients = np.linalg.lstsq(d.T, centred.T, rcond=None)[0]
        projection = (d.T @ coefficients).T
        np.testing.assert_allclose(got.sum(axis=1), projection.sum(axis=1), rtol=1e-6, atol=1e-9)
    else:  # a single direction is <a' - m', d> <1, d>
        np.testing.assert_allclose(got[:, 0], (centred @ d[0]) * d[0].sum(), rtol=1e-6)


def test_spufix_applies_transferred_directions_with_their_floor(data) -> None:
    features, weight_row, alphas, queries = data
    moved = _accumulate(features, weight_row, alphas, [5, 9])
    moved.alphas = transfer_alphas(moved, weight_row, features)
    weight = np.zeros((4, D), np.float32)
    weight[3] = weight_row
    fix = SpuFix({}, {}, weight, transferred={3: moved}, dtype=torch.float64)
    assert [(e.class_index, e.component, e.transferred) for e in fix.entries] == [(3, 5, True), (3, 9, True)]
    logits = torch.zeros(len(queries), 4, dtype=torch.float64)
    logits[:, 3] = 10.0
    _, _, contributions, _ = reference(features, weight_row, alphas, queries)
    _, _, over_fit_images, _ = reference(features, weight_row, alphas, features)
    floors = np.percentile(over_fit_images, 5, axis=0)
    result = fix.score(torch.from_numpy(queries), logits, "floor")
    want = np.clip(contributions - floors, 0, None).sum(axis=1)
    np.testing.assert_allclose(result.spurious_alpha.numpy(), want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(result.logits[:, 3].numpy(), 10.0 - want, rtol=1e-6)
    np.testing.assert_allclose(result.alphas.numpy(), contributions, rtol=1e-6, atol=1e-9)
    paper = fix.apply(torch.from_numpy(queries), logits, "paper")
    np.testing.assert_allclose(paper[:, 3].numpy(), 10.0 - np.clip(contributions, 0, None).sum(axis=1), rtol=1e-6)


def test_a_direction_without_covariance_or_images_is_refused(data) -> None:
    features, weight_row, alphas, _ = data
    accumulator = MaxCovAccumulator(weight_row, 1)
    accumulator.update(features[:1], alphas[:1, :1])
    with pytest.raises(FailedPrecondition, match="at least 2"):
        accumulator.finalize(0, [0])
    flat = MaxCovAccumulator(weight_row, 1)
    flat.update(np.ones((10, D), np.float32), alphas[:10, :1])  # a' is the same for every image
    with pytest.raises(FailedPrecondition, match="do not covary with source component"):
        flat.finalize(0, [4])
