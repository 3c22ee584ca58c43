"""ROC AUC, average precision and the spurious score table: hand-worked cases and sklearn."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from spurguard.server.engine import average_precision, roc_auc, spurious_score_table
from spurguard.server.errors import InvalidInput

E = np.e


@pytest.mark.parametrize(
    "labels, scores, auc, ap",
    [
        # Positives {0.9, 0.5}, negatives {0.5, 0.1}: pairs won 1 + 1 + 1, the tie 0.5 -> 3.5 / 4.
        # AP thresholds 0.9 (P=1, R=1/2), 0.5 (the tie: P=2/3, R=1), 0.1 (R unchanged):
        # 1/2 * 1 + 1/2 * 2/3 = 5/6.
        ([1, 0, 1, 0], [0.9, 0.5, 0.5, 0.1], 3.5 / 4, 5 / 6),
        # Positives {0.7, 0.6, 0.2} beat negatives {0.8, 0.4} in 2 of 6 pairs.
        # AP: 0.7 (P=1/2, R=1/3), 0.6 (P=2/3, R=2/3), 0.2 (P=3/5, R=1): (1/2 + 2/3 + 3/5) / 3.
        ([0, 1, 1, 0, 1], [0.8, 0.7, 0.6, 0.4, 0.2], 2 / 6, (1 / 2 + 2 / 3 + 3 / 5) / 3),
        # All tied: every pair is a tie; one threshold with precision = share of positives.
        ([1, 0, 0, 1], [0.3, 0.3, 0.3, 0.3], 0.5, 0.5),
        # Perfect ranking.
        ([True, True, False], [3.0, 2.0, 1.0], 1.0, 1.0),
    ],
)
def test_hand_worked(labels, scores, auc, ap):
    assert roc_auc(labels, scores) == pytest.approx(auc, abs=1e-15)
    assert average_precision(labels, scores) == pytest.approx(ap, abs=1e-15)


@pytest.mark.parametrize("seed", range(25))
def test_agrees_with_sklearn_on_random_scores_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = np.round(rng.random(n) + 0.3 * labels, int(rng.integers(0, 3)))  # coarse: many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, torch.from_numpy(scores)) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_metric_input_errors():
    with pytest.raises(InvalidInput):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(InvalidInput):
        average_precision([0, 0], [0.2, 0.3])
    with pytest.raises(InvalidInput):
        roc_auc([1, 2], [0.2, 0.3])
    with pytest.raises(InvalidInput):
        roc_auc([1, 0], [0.2])
    with pytest.raises(InvalidInput):
        roc_auc([1, 0], [0.2, np.nan])


CLEAN = np.array([[2.0, 0, 0], [0, 1, 0], [0, 3, 0]])
CLEAN_Y = np.array([0, 0, 1])
SPUR = np.array([[1.0, 0, 0], [0, 0, 2], [0, 0, 0]])
SPUR_Y = np.array([0, 0, 1])


def test_score_table_hand_worked():
    table = spurious_score_table(CLEAN, CLEAN_Y, SPUR, SPUR_Y)
    c0, c1 = table.classes
    # Class 0: p(0|x) clean {e^2/(e^2+2) = .787, 1/(e+2) = .212}, spurious {e/(e+2) = .576,
    # 1/(e^2+2) = .107}: 3 of 4 pairs ordered right; AP = 1/2 * 1 + 1/2 * 2/3.
    assert (c0.class_index, c0.auc, c0.ap) == (0, 0.75, pytest.approx(5 / 6))
    assert c0.clean_mean_prob == pytest.approx((E**2 / (E**2 + 2) + 1 / (E + 2)) / 2)
    assert c0.spurious_mean_prob == pytest.approx((E / (E + 2) + 1 / (E**2 + 2)) / 2)
    assert (c0.clean_frac_predicted, c0.spurious_frac_predicted) == (0.5, 0.5)
    # Class 1: clean e^3/(e^3+2) beats spurious 1/3; the all-zero spurious logits predict class 0.
    assert (c1.auc, c1.ap, c1.clean_frac_predicted, c1.spurious_frac_predicted) == (1.0, 1.0, 1.0, 0.0)
    assert c1.spurious_mean_prob == pytest.approx(1 / 3)
    assert table.mean_auc == pytest.approx(0.875)
    assert table.mean_ap == pytest.approx((5 / 6 + 1) / 2)
    # set level: clean predictions 0, 1, 1 for labels 0, 0, 1; spurious 0, 2, 0 for 0, 0, 1
    assert (table.clean_accuracy, table.spurious_frac_predicted) == (pytest.approx(2 / 3), pytest.approx(1 / 3))


def test_table_serialises_to_the_spec_fields():
    fixed_spur = SPUR - np.array([2.0, 0, 0])  # a fix that lowers class 0's logit
    baseline = json.loads(json.dumps(spurious_score_table(CLEAN, CLEAN_Y, SPUR, SPUR_Y).to_dict()))
    fixed = json.loads(json.dumps(spurious_score_table(CLEAN, CLEAN_Y, fixed_spur, SPUR_Y).to_dict()))
    fields = {"class", "auc", "ap", "clean_mean_prob", "spurious_mean_prob",
              "clean_frac_predicted", "spurious_frac_predicted"}
    assert set(baseline) == {"mean_auc", "mean_ap", "classes", "clean_accuracy", "spurious_frac_predicted"}
    assert [set(c) for c in baseline["classes"]] == [fields, fields]
    assert fixed["classes"][0]["auc"] == 1.0 > baseline["classes"][0]["auc"]


def test_score_table_errors():
    with pytest.raises(InvalidInput, match="class 2"):
        spurious_score_table(CLEAN, CLEAN_Y, SPUR, np.array([0, 0, 2]))
    with pytest.raises(InvalidInput):
        spurious_score_table(CLEAN, CLEAN_Y, SPUR[:, :2], SPUR_Y)
    with pytest.raises(InvalidInput):
        spurious_score_table(CLEAN, CLEAN_Y[:2], SPUR, SPUR_Y)
    with pytest.raises(InvalidInput):
        spurious_score_table(CLEAN, CLEAN_Y, SPUR[:0], SPUR_Y[:0])
