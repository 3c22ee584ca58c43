"""Spurious score (the Spurious ImageNet benchmark): ROC AUC and average precision per class.

Per class k: positives = clean images of class k, negatives = images showing k's spurious
feature without the class object, score = softmax p(k|x). ROC AUC is what the paper's text
reports; average precision is what its published evaluation code computes, so both are here,
implemented in numpy (the server does not depend on scikit-learn) and tested against it.
Rows and tables are the vocabulary's ClassScore and ScoreTable, so `evaluate --json` has
one definition.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spurguard.server.errors import InvalidInput
from spurguard.vocab import ClassScore, ScoreTable


def _numpy(x: Any) -> np.ndarray:
    """numpy from numpy or a torch tensor on any device, without importing torch here."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y, s = _numpy(labels), _numpy(scores).astype(np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise InvalidInput(f"labels and scores must be 1-D of one length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise InvalidInput("labels must be 0/1 (or boolean)")
    if not np.isfinite(s).all():
        raise InvalidInput("scores contain NaN or infinity")
    return y.astype(bool), s


def roc_auc(labels: Any, scores: Any) -> float:
    """P(score of a random positive > a random negative), ties counted 1/2 (Mann-Whitney U)."""
    y, s = _binary_inputs(labels, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise InvalidInput(f"ROC AUC needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((starts + 1 + ends) / 2.0, ends - starts)  # 1-based, ties averaged
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(labels: Any, scores: Any) -> float:
    """sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, descending (sklearn's AP).

    Tied scores form one threshold, so a tie between a positive and a negative counts both.
    """
    y, s = _binary_inputs(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise InvalidInput("average precision needs at least one positive")
    order = np.argsort(-s, kind="mergesort")
    last_of_threshold = np.flatnonzero(np.r_[np.diff(s[order]) != 0, True])
    true_pos = np.cumsum(y[order])[last_of_threshold]
    precision = true_pos / (last_of_threshold + 1)
    recall = true_pos / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def softmax(logits: Any) -> np.ndarray:
    """Row-wise softmax in float64, so confident predictions do not saturate into ties."""
    z = _numpy(logits).astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _labels(x: Any, rows: int, num_classes: int, name: str) -> np.ndarray:
    y = _numpy(x)
    if y.shape != (rows,) or (rows and not np.issubdtype(y.dtype, np.integer)):
        raise InvalidInput(f"{name} must be {rows} integers, got shape {y.shape} dtype {y.dtype}")
    if rows and (y.min() < 0 or y.max() >= num_classes):
        raise InvalidInput(f"{name} must lie in [0, {num_classes})")
    return y.astype(np.int64)


def _logits(x: Any, name: str) -> np.ndarray:
    z = _numpy(x)
    if z.ndim != 2 or z.shape[1] == 0:
        raise InvalidInput(f"{name} must be [N, C], got shape {z.shape}")
    return z


def spurious_score_table(
    clean_logits: Any,
    clean_labels: Any,
    spurious_logits: Any,
    spurious_labels: Any,
    classes: Sequence[int] | None = None,
) -> ScoreTable:
    """Score every class with spurious images (or the listed `classes`), plus the set-level
    clean accuracy and share of spurious images predicted as their class (over all images).

    `spurious_labels[i]` is the class whose spurious feature image i shows. A class needs both
    clean and spurious images, else its AUC is undefined: InvalidInput.
    """
    clean, spur = _logits(clean_logits, "clean logits"), _logits(spurious_logits, "spurious logits")
    num_classes = clean.shape[1]
    if spur.shape[1] != num_classes:
        raise InvalidInput(f"clean logits have {num_classes} classes, spurious {spur.shape[1]}")
    clean_y = _labels(clean_labels, clean.shape[0], num_classes, "clean labels")
    spur_y = _labels(spurious_labels, spur.shape[0], num_classes, "spurious labels")
    wanted = sorted({int(k) for k in (np.unique(spur_y) if classes is None else classes)})
    if not wanted:
        raise InvalidInput("no class to evaluate: the spurious set is empty")
    clean_p, spur_p = softmax(clean), softmax(spur)
    clean_top, spur_top = clean.argmax(axis=1), spur.argmax(axis=1)
    rows = []
    for k in wanted:
        pos, neg = clean_y == k, spur_y == k
        if not pos.any() or not neg.any():
            raise InvalidInput(
                f"class {k} has {int(pos.sum())} clean and {int(neg.sum())} spurious images; needs both"
            )
        scores = np.r_[clean_p[pos, k], spur_p[neg, k]]
        truth = np.r_[np.ones(int(pos.sum()), bool), np.zeros(int(neg.sum()), bool)]
        rows.append(
            ClassScore(
                class_index=k,
                auc=roc_auc(truth, scores),
                ap=average_precision(truth, scores),
                clean_mean_prob=float(clean_p[pos, k].mean()),
                spurious_mean_prob=float(spur_p[neg, k].mean()),
                clean_frac_predicted=float((clean_top[pos] == k).mean()),
                spurious_frac_predicted=float((spur_top[neg] == k).mean()),
            )
        )
    return ScoreTable(
        mean_auc=float(np.mean([row.auc for row in rows])),
        mean_ap=float(np.mean([row.ap for row in rows])),
        classes=tuple(rows),
        clean_accuracy=float((clean_top == clean_y).mean()),
        spurious_frac_predicted=float((spur_top == spur_y).mean()),
    )
