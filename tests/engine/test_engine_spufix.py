"""SpuFix: both modes against a direct numpy reference, floors, evidence, trigger, errors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from spurguard.server.engine import Decomposer, SpuFix, fit_alphas, fit_components
from spurguard.server.errors import FailedPrecondition, InvalidInput

L = 6
SPURIOUS = {0: [2, 0], 2: [1], 3: []}  # classes 1 and 3 have no spurious components


@pytest.fixture(scope="module")
def fitted(small_problem):
    p = small_problem
    components = fit_components(p.weight, p.features, p.labels, L)
    for k, c in components.items():
        c.alphas = fit_alphas(c, p.weight[k], p.class_rows(k))
    return components


@pytest.fixture(scope="module")
def logits(small_problem, fitted):
    return Decomposer(fitted, small_problem.weight, small_problem.bias).logits(small_problem.features)


def reference_fix(problem, fitted, logits, mode, percentile):
    """logit'_k = logit_k - sum_{l in S_k} max(alpha_l - f_l, 0), f_l = 0 in paper mode, float64."""
    fixed = logits.numpy().astype(np.float64)
    penalties = {}
    for k, indices in SPURIOUS.items():
        comp = fitted[k]
        v = comp.vectors[indices]
        w = problem.weight[k].astype(np.float64)

        def alphas(features, v=v, w=w, comp=comp):
            return ((features.astype(np.float64) * w - comp.mean) @ v.T) * v.sum(axis=1)

        floor = np.percentile(alphas(problem.class_rows(k)), percentile, axis=0)
        excess = alphas(problem.features) - (floor if mode == "floor" else 0.0)
        penalties[k] = np.maximum(excess, 0.0).sum(axis=1)
        fixed[:, k] -= penalties[k]
    return fixed, penalties


@pytest.mark.parametrize("mode, percentile", [("paper", 5.0), ("floor", 5.0), ("floor", 30.0)])
def test_fix_matches_numpy_reference(small_problem, fitted, logits, mode, percentile):
    spufix = SpuFix(fitted, SPURIOUS, small_problem.weight, floor_percentile=percentile)
    assert spufix.spurious_classes == [0, 2]
    fixed = spufix.apply(small_problem.features, logits, mode)
    expected, _ = reference_fix(small_problem, fitted, logits, mode, percentile)
    np.testing.assert_allclose(fixed.numpy(), expected, rtol=1e-5, atol=1e-4)
    # Classes without spurious components are untouched, bit for bit.
    assert torch.equal(fixed[:, [1, 3]], logits[:, [1, 3]])
    assert torch.all(fixed <= logits)


def test_floor_removes_more_than_paper_and_percentile_matters(small_problem, fitted, logits):
    p = small_problem
    paper = SpuFix(fitted, SPURIOUS, p.weight).apply(p.features, logits, "paper")
    floor5 = SpuFix(fitted, SPURIOUS, p.weight).apply(p.features, logits, "floor")
    floor50 = SpuFix(fitted, SPURIOUS, p.weight, floor_percentile=50).apply(p.features, logits, "floor")
    # The 5th percentile of alpha is below its mean (zero), so floor mode removes more.
    assert torch.all(floor5 <= paper + 1e-5) and torch.any(floor5 < paper - 1e-3)
    assert torch.all(floor5 <= floor50 + 1e-5) and torch.any(floor5 < floor50 - 1e-3)


def test_spurious_alpha_and_trigger(small_problem, fitted, logits):
    p = small_problem
    spufix = SpuFix(fitted, SPURIOUS, p.weight)
    _, penalties = reference_fix(p, fitted, logits, "floor", 5.0)
    for mode in ("paper", "floor"):
        result = spufix.score(p.features, logits, mode)
        top1 = logits.argmax(dim=1)
        assert result.mode == mode and torch.equal(result.class_index, top1)
        expected_alpha = np.array([penalties.get(int(k), np.zeros(len(top1)))[i] for i, k in enumerate(top1)])
        np.testing.assert_allclose(result.spurious_alpha.numpy(), expected_alpha, rtol=1e-5, atol=1e-4)
        fixed = spufix.apply(p.features, logits, mode)
        torch.testing.assert_close(result.logits, fixed)
        assert torch.equal(result.trigger, fixed.argmax(dim=1) != top1)
    # Named class: evidence for class 0 on every image; no trigger where 0 is not the top-1.
    named = spufix.score(p.features, logits, "floor", class_index=0)
    np.testing.assert_allclose(named.spurious_alpha.numpy(), penalties[0], rtol=1e-5, atol=1e-4)
    assert not named.trigger[logits.argmax(dim=1) != 0].any()


def test_trigger_semantics_on_crafted_logits(small_problem, fitted):
    """Image 0: class 0 wins by a hair and carries spurious evidence -> trigger. Image 1: same
    evidence but a huge margin -> no trigger. Image 2: top-1 is class 1 (no spurious components)."""
    p = small_problem
    spufix = SpuFix(fitted, SPURIOUS, p.weight)
    evidence = spufix.score(p.features, np.zeros((len(p.labels), 4), np.float32), class_index=0)
    image = int(torch.argmax(evidence.spurious_alpha))
    assert evidence.spurious_alpha[image] > 0.1
    features = p.features[[image, image, image]]
    crafted = np.array([[1e-3, 0, 0, 0], [1e3, 0, 0, 0], [0, 1e-3, 0, 0]], np.float32)
    result = spufix.score(features, crafted)
    assert result.trigger.tolist() == [True, False, False]
    assert result.class_index.tolist() == [0, 0, 1]
    assert result.spurious_alpha[2] == 0  # class 1 has no spurious components


def test_without_spurious_components_nothing_changes(small_problem, fitted, logits):
    p = small_problem
    spufix = SpuFix(fitted, {1: []}, p.weight)
    result = spufix.score(p.features, logits, "paper")
    assert torch.equal(result.logits, logits)
    assert torch.all(result.spurious_alpha == 0) and not result.trigger.any()


def test_errors(small_problem, fitted, logits):
    p = small_problem
    with pytest.raises(InvalidInput):
        SpuFix(fitted, {0: [L]}, p.weight)
    with pytest.raises(FailedPrecondition):
        SpuFix({0: fitted[0]}, {1: [0]}, p.weight)
    with pytest.raises(InvalidInput):
        SpuFix(fitted, SPURIOUS, p.weight, floor_percentile=101)
    spufix = SpuFix(fitted, SPURIOUS, p.weight)
    with pytest.raises(InvalidInput):
        spufix.apply(p.features, logits, "median")
    with pytest.raises(InvalidInput):
        spufix.apply(p.features, logits[:, :3])
    with pytest.raises(InvalidInput):
        spufix.apply(p.features[:, :5], logits)
    # Without fit-image alphas there is no floor: paper mode works, floor mode says why not.
    bare = {k: dataclasses.replace(c, alphas=np.zeros((0, 0), np.float32)) for k, c in fitted.items()}
    no_floor = SpuFix(bare, SPURIOUS, p.weight)
    no_floor.apply(p.features, logits, "paper")
    with pytest.raises(FailedPrecondition, match="alphas"):
        no_floor.apply(p.features, logits, "floor")
