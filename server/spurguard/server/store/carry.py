"""Labels across refits (SPEC §1 Labels): a refit carries each label of the fit it replaces to
the new fit's component that best matches it, |cos| >= CARRY_MIN_COS between the eigenvectors.

Why eigenvectors and not component indices: a refit on more or other images reorders components
whose eigenvalues are close, and a component whose direction moved is no longer the feature the
labeller saw. Two old components cannot claim the same new one: orthonormal vectors cannot both
have |cos| >= 0.95 (cos^2 > 1/2) with one unit vector. What cannot be carried stays on the old
fit and is listed in the Fit summary, so no label is lost silently.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from spurguard.server.store.labels import UNLABELED, Label, LabelDB
from spurguard.vocab import LabelCarried, LabelNotCarried

CARRY_MIN_COS = 0.95


@dataclass(frozen=True)
class LabelCarry:
    """What a commit did with the labels of the fit it replaced (kept in the new fit's manifest)."""

    from_fit: str
    carried: tuple[LabelCarried, ...]
    not_carried: tuple[LabelNotCarried, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "from_fit": self.from_fit,
            "carried": [vars(c) for c in self.carried],
            "not_carried": [vars(c) for c in self.not_carried],
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> LabelCarry:
        return cls(
            record["from_fit"],
            tuple(LabelCarried(**c) for c in record["carried"]),
            tuple(LabelNotCarried(**c) for c in record["not_carried"]),
        )


def _note(record: Label, from_fit: str, cos: float) -> str:
    carried = f"carried from fit {from_fit} component {record.component} (|cos| {cos:.3f})"
    return f"{carried}; {record.note}" if record.note else carried


def match_labels(
    labels: list[Label], old_vectors: dict[int, np.ndarray], new_vectors: dict[int, np.ndarray]
) -> tuple[list[tuple[Label, int, float]], list[LabelNotCarried]]:
    """Each labelled old component's best new component: (label, new component, |cos|) where it
    matches, a LabelNotCarried where it does not. `*_vectors`: class -> [L, d] orthonormal rows."""
    by_class: dict[int, list[Label]] = defaultdict(list)
    for record in labels:
        if record.label != UNLABELED:
            by_class[record.class_index].append(record)
    matched: list[tuple[Label, int, float]] = []
    unmatched: list[LabelNotCarried] = []
    for k, records in sorted(by_class.items()):
        if k not in new_vectors:
            unmatched += [LabelNotCarried(k, r.component, r.label, 0.0, f"class {k} is not in the new fit")
                          for r in records]
            continue
        cos = np.abs(old_vectors[k] @ new_vectors[k].T)  # [L_old, L_new]
        for record in records:
            best = int(np.argmax(cos[record.component])) if cos.shape[1] else 0
            value = float(cos[record.component, best]) if cos.shape[1] else 0.0
            if value >= CARRY_MIN_COS:
                matched.append((record, best, value))
            else:
                unmatched.append(LabelNotCarried(
                    k, record.component, record.label, value,
                    f"no component of the new fit matches it (best |cos| {value:.3f} < {CARRY_MIN_COS})",
                ))
    return matched, unmatched


def carry_labels(
    db: LabelDB,
    to_fit: str,
    labels: list[Label],
    old_vectors: dict[int, np.ndarray],
    new_vectors: dict[int, np.ndarray],
) -> tuple[list[LabelCarried], list[LabelNotCarried]]:
    """Write the matching ones of `labels` (of one old fit) onto `to_fit`, with a note saying so
    and their authors; what did not match is returned, not written. `old_vectors` needs the labelled classes."""
    matched, unmatched = match_labels(labels, old_vectors, new_vectors)
    for record, component, cos in matched:
        db.set(record.model, record.digest, to_fit, record.class_index, component, record.label,
               _note(record, record.fit_id, cos), author=record.author)  # still who decided it
    return [LabelCarried(r.class_index, r.component, c, r.label, cos) for r, c, cos in matched], unmatched
