"""Label matching across refits (store.carry) on seeded random bases: a label follows its
eigenvector to wherever the refit put it, and only when |cos| >= 0.95."""
from __future__ import annotations

import numpy as np

from spurguard.server.store.carry import CARRY_MIN_COS, match_labels
from spurguard.server.store.labels import Label


def _label(k: int, component: int, label: str = "spurious") -> Label:
    return Label("m", "d", "old", k, component, label, "", "2026-01-01T00:00:00Z")


def _orthonormal(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((dim, rows)))[0].T


def test_labels_follow_their_eigenvector_through_a_reordering_and_a_sign_flip() -> None:
    rng = np.random.default_rng(0)
    old = _orthonormal(rng, 6, 32)
    new = -old[[3, 0, 1, 2, 5, 4]]  # reordered, signs flipped
    matched, unmatched = match_labels([_label(0, 0), _label(0, 4, "not_spurious")], {0: old}, {0: new})
    assert [(r.component, to) for r, to, _ in matched] == [(0, 1), (4, 5)] and unmatched == []
    assert all(abs(cos - 1) < 1e-12 for _, _, cos in matched)


def test_a_turned_eigenvector_is_carried_only_above_the_threshold() -> None:
    rng = np.random.default_rng(1)
    basis = _orthonormal(rng, 4, 16)
    old, new = basis[:2].copy(), basis[:2].copy()
    for row, angle in ((0, np.arccos(CARRY_MIN_COS) * 0.9), (1, np.arccos(CARRY_MIN_COS) * 1.1)):
        new[row] = np.cos(angle) * basis[row] + np.sin(angle) * basis[2 + row]  # turned away, still orthonormal
    matched, unmatched = match_labels([_label(3, 0), _label(3, 1)], {3: old}, {3: new})
    assert [(r.component, to) for r, to, _ in matched] == [(0, 0)]
    (lost,) = unmatched
    assert (lost.class_index, lost.component) == (3, 1) and lost.best_cos < CARRY_MIN_COS
    np.testing.assert_allclose(lost.best_cos, np.cos(np.arccos(CARRY_MIN_COS) * 1.1), rtol=1e-10)


def test_unlabeled_records_are_ignored_and_a_missing_class_is_listed() -> None:
    rng = np.random.default_rng(2)
    old = _orthonormal(rng, 3, 8)
    matched, unmatched = match_labels([_label(1, 0, "unlabeled"), _label(2, 1)], {1: old, 2: old}, {1: old})
    assert matched == [] and [(x.class_index, x.component, x.best_cos) for x in unmatched] == [(2, 1, 0.0)]
    assert unmatched[0].reason == "class 2 is not in the new fit"
