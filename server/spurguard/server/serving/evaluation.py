"""The spurious score benchmark over image folders: clean vs spurious-only images, with and
without SpuFix (SPEC §1), as one pass of forward passes.

Only the logits [N, C] (plain and fixed) are kept per image, never features or pixels.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from spurguard.server.backends.base import Backend
from spurguard.server.datasets import ClassResolver, ImageEntry, list_image_folder, list_spurious_folder
from spurguard.server.engine import spurious_score_table
from spurguard.server.errors import Cancelled, InvalidInput
from spurguard.server.loader import iter_features
from spurguard.server.serving.guard import Guard
from spurguard.server.serving.options import EvaluateSettings
from spurguard.server.serving.paths import DataRoots
from spurguard.vocab import EvaluateProgress, EvaluateResult, SpufixModeName, to_json

MAX_KEPT_SKIPPED = 100  # unreadable files named in a kept evaluation (all are counted)


@dataclass(frozen=True)
class EvaluationOutcome:
    """The table the client gets, and the images that could not be read: (id, why)."""

    result: EvaluateResult
    skipped: list[tuple[str, str]]

    def record(self, clean: str | os.PathLike[str], spurious: str | os.PathLike[str],
               settings: EvaluateSettings) -> dict[str, Any]:
        """What the store keeps of a finished evaluation: the request, the tables (as `evaluate
        --json`) and the first unreadable files."""
        return {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "request": {"clean": str(clean), "spurious": str(spurious), "spufix": settings.mode,
                        "classes": list(settings.classes or ()), "batch_size": settings.batch_size,
                        "directions": settings.directions},
            **to_json(self.result),
            "skipped": [list(entry) for entry in self.skipped[:MAX_KEPT_SKIPPED]],
        }


def run_evaluate(
    backend: Backend,
    guard: Guard,
    clean_root: str | os.PathLike[str],
    spurious_root: str | os.PathLike[str],
    *,
    mode: SpufixModeName = "floor",
    classes: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: Callable[[EvaluateProgress], None] | None = None,
    cancel: threading.Event | None = None,
    roots: DataRoots | None = None,
) -> EvaluationOutcome:
    """Score both folders and build the table without and with SpuFix in `mode`, removing the
    spurious directions `guard` applies (its `directions`, which the result names).

    The table covers the classes with spurious images (or `classes`); clean accuracy is over
    every clean image. Every image must lie inside `roots` (default: the two folders), else
    PermissionDenied before anything is read.
    """
    started = time.monotonic()

    def report(phase: str, done: int) -> None:
        if progress is not None:
            progress(EvaluateProgress(phase, done, total, time.monotonic() - started))

    batch_size = batch_size or backend.max_batch_size
    resolver = ClassResolver(backend.class_names, backend.class_wnids)
    clean_entries = list_image_folder(clean_root, resolver)
    spurious_entries: list[ImageEntry] = list(list_spurious_folder(spurious_root, backend.num_classes))
    if classes is not None:
        wanted = set(classes)
        spurious_entries = [e for e in spurious_entries if e.class_index in wanted]
        if not spurious_entries:
            raise InvalidInput(f"the spurious dataset has no images of classes {sorted(wanted)}; "
                               "leave classes empty for every class it has")
    if roots is None:
        roots = DataRoots([clean_root, spurious_root])
    roots.check_listing(e.path for e in [*clean_entries, *spurious_entries])
    total = len(clean_entries) + len(spurious_entries)
    report("scanning", 0)
    done = [0]
    skipped: list[tuple[str, str]] = []

    def score(entries: Sequence[ImageEntry], phase: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        plain, fixed, labels = [], [], []
        for batch, features in iter_features(entries, backend, batch_size, cancel, read=roots.read):
            skipped.extend((e.image_id, why) for e, why in batch.skipped)
            if batch.entries:
                plain.append(guard.logits(features).cpu())
                fixed.append(guard.fixed_logits(features, mode).cpu())
                labels.extend(e.class_index for e in batch.entries)
            done[0] += len(batch.entries) + len(batch.skipped)
            report(phase, done[0])
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluation cancelled")
        if not plain:
            raise InvalidInput(f"no readable {phase} images")
        return torch.cat(plain).numpy(), torch.cat(fixed).numpy(), np.asarray(labels, np.int64)

    clean, clean_fixed, clean_y = score(clean_entries, "clean")
    spur, spur_fixed, spur_y = score(spurious_entries, "spurious")
    result = EvaluateResult(
        model=backend.name,
        fit_id=guard.fit_id or "",
        baseline=spurious_score_table(clean, clean_y, spur, spur_y, classes),
        spufix=spurious_score_table(clean_fixed, clean_y, spur_fixed, spur_y, classes),
        spufix_mode=mode,
        clean_images=int(clean_y.shape[0]),
        spurious_images=int(spur_y.shape[0]),
        skipped_images=len(skipped),
        directions=guard.directions,
        transfer_id=guard.transfer_id or "",
        spurious_directions=guard.applied_directions(),
    )
    return EvaluationOutcome(result, skipped)
