"""Logit decomposition: the identity, float64 reference values, per-image vs per-class paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spurguard.server.engine import Decomposer, fit_components
from spurguard.server.errors import FailedPrecondition, InvalidInput

L = 6
F32 = np.finfo(np.float32).eps


@pytest.fixture(scope="module")
def fitted(small_problem):
    return fit_components(small_problem.weight, small_problem.features, small_problem.labels, L)


@pytest.fixture(scope="module")
def decomposer(small_problem, fitted):
    return Decomposer(fitted, small_problem.weight, small_problem.bias)


def test_identity_and_float64_reference(small_problem, decomposer, ref_pca):
    """Every image (of any class, so residuals are nonzero) analysed for its top-1 class."""
    p = small_problem
    out = decomposer.decompose(p.features)
    logits64 = p.features.astype(np.float64) @ p.weight.T.astype(np.float64) + p.bias
    np.testing.assert_allclose(out.logits.numpy(), logits64, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.class_index, out.logits.argmax(dim=1))

    terms = [out.bias_term, out.alphas.sum(dim=1), out.residual, out.logit]
    magnitude = sum(t.abs() for t in terms).numpy()
    identity_error = (out.bias_term + out.alphas.sum(dim=1) + out.residual - out.logit).numpy()
    assert np.all(np.abs(identity_error) <= 8 * F32 * magnitude)

    for k in range(p.num_classes):
        rows = out.class_index.numpy() == k
        if not rows.any():
            continue
        ref = ref_pca(p, k)
        all_alphas = ref.alphas(p.features[rows], p.weight[k])  # every component, float64
        # The reference's own identity: the full sum of alphas recovers the logit exactly.
        np.testing.assert_allclose(
            p.bias[k] + ref.mean.sum() + all_alphas.sum(axis=1), logits64[rows, k], rtol=1e-9, atol=1e-9
        )
        scale = np.abs(logits64[rows, k]).max() + np.abs(all_alphas).max()
        np.testing.assert_allclose(out.alphas.numpy()[rows], all_alphas[:, :L], rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(out.bias_term.numpy()[rows], p.bias[k] + ref.mean.sum(), rtol=1e-6)
        np.testing.assert_allclose(
            out.residual.numpy()[rows], all_alphas[:, L:].sum(axis=1), rtol=1e-4, atol=1e-4 * scale
        )


def test_per_image_class_index_equals_per_class(small_problem, decomposer):
    p = small_problem
    index = np.random.default_rng(7).integers(0, p.num_classes, len(p.labels))
    mixed = decomposer.decompose(p.features, class_index=index)
    assert np.array_equal(mixed.class_index.numpy(), index)
    torch.testing.assert_close(decomposer.alphas(p.features, torch.from_numpy(index)), mixed.alphas)
    for k in range(p.num_classes):
        single = decomposer.decompose(p.features, class_index=k)
        rows = torch.from_numpy(index == k)
        for name in ("logit", "bias_term", "alphas", "residual"):
            torch.testing.assert_close(
                getattr(mixed, name)[rows], getattr(single, name)[rows], rtol=1e-6, atol=1e-5
            )


def test_given_logits_are_used(small_problem, decomposer):
    p = small_problem
    logits = decomposer.logits(p.features) + 1.0
    out = decomposer.decompose(p.features, logits=logits)
    torch.testing.assert_close(out.logit, logits.gather(1, out.class_index[:, None]).squeeze(1))
    torch.testing.assert_close(
        out.residual, decomposer.decompose(p.features, class_index=out.class_index).residual + 1.0
    )


def test_classes_with_fewer_components_are_zero_padded(problem_factory):
    p = problem_factory(seed=8, num_classes=2, dim=20, per_class=[40, 4])
    fitted = fit_components(p.weight, p.features, p.labels, L)
    assert [fitted[0].num_components, fitted[1].num_components] == [L, 3]
    out = Decomposer(fitted, p.weight, p.bias).decompose(p.features, class_index=1)
    assert out.alphas.shape == (len(p.labels), L)
    assert torch.all(out.alphas[:, 3:] == 0)
    # Class 1's three components hold all its variance: its own images have no residual.
    own = torch.from_numpy(p.labels == 1)
    torch.testing.assert_close(out.residual[own], torch.zeros(4), atol=1e-5, rtol=0)


def test_errors(small_problem, fitted, decomposer):
    p = small_problem
    partial = Decomposer({0: fitted[0]}, p.weight, p.bias)
    with pytest.raises(FailedPrecondition, match="class 1"):
        partial.decompose(p.features, class_index=1)
    with pytest.raises(InvalidInput):
        decomposer.decompose(p.features, class_index=4)
    with pytest.raises(InvalidInput):
        decomposer.decompose(p.features, class_index=[0, 1])
    with pytest.raises(InvalidInput):
        decomposer.decompose(p.features[:, :-1])
    with pytest.raises(InvalidInput):
        decomposer.decompose(p.features, logits=np.zeros((len(p.labels), 3), np.float32))
    with pytest.raises(InvalidInput):
        decomposer.decompose(p.features, logits=np.zeros((2, 4), np.float32))
    with pytest.raises(InvalidInput):
        Decomposer(fitted, p.weight, p.bias[:-1])
    with pytest.raises(InvalidInput):
        Decomposer({1: fitted[0]}, p.weight, p.bias)
    with pytest.raises(InvalidInput):
        Decomposer(fitted, p.weight[:, :-1], p.bias)
