"""A transfer job: the source's labelled components into a target model, over the source fit's images.

What it reads is fixed when it is asked for (`plan_transfer`): the source's current fit, its
spurious labels (the snapshot) and the classes. That source state names the transfer
(`transfer_id`), so asking again from the same state finds the stored transfer (and makes it the
one in use again), a cancelled or killed one resumes after its finished classes, and
re-labelling the source makes a new transfer instead of changing the one the target applies.

The pass is Fit's: the fit images listed by class, read through DataRoots and decoded by the
target's preprocessing one batch ahead of its forward (loader.iter_features). Per class the
engine's MaxCovAccumulator keeps O(m d) sums; the features are spilled to the transfer's scratch
folder, since each image's contribution (for the floor) needs the final directions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from spurguard.server.backends.base import Backend
from spurguard.server.datasets import ImageEntry
from spurguard.server.engine import DEFAULT_FLOOR_PERCENTILE, MaxCovAccumulator, transfer_alphas
from spurguard.server.errors import Cancelled, FailedPrecondition
from spurguard.server.loader import iter_features
from spurguard.server.serving.fitting import FeatureSpill, alphas_chunked, spilled_rows
from spurguard.server.serving.paths import DataRoots
from spurguard.server.store import Label, Store, StoredTransfer, TransferSettings, TransferWriter
from spurguard.vocab import (
    SPURIOUS,
    FitProgress,
    TransferClass,
    TransferDirection,
    TransferInfo,
    TransferSummary,
)


@dataclasses.dataclass(frozen=True)
class TransferPlan:
    """A transfer as asked: the target, and the source state it is made from."""

    transfer_id: str
    target: str  # target model name
    digest: str  # target digest: the transfer's store folder
    settings: TransferSettings

    @property
    def spurious(self) -> dict[int, list[int]]:
        """Class -> the source fit's spurious components, ascending."""
        found: dict[int, list[int]] = {}
        for label in self.settings.labels:
            found.setdefault(label["class_index"], []).append(label["component"])
        return {k: sorted(found[k]) for k in sorted(found)}


def source_name(settings: TransferSettings, class_index: int, component: int) -> str:
    """`ComponentAlpha.source`: MODEL/FIT_ID/CLASS/COMPONENT."""
    return f"{settings.source_model}/{settings.source_fit}/{class_index}/{component}"


def _digest(value: object, length: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def plan_transfer(source: Backend, target: Backend, store: Store, classes: Sequence[int]) -> TransferPlan:
    """The source state to transfer: FAILED_PRECONDITION if it has no fit, no spurious labels (in
    `classes`, or at all when `classes` is empty), or other classes than the target. Blocking."""
    if source.num_classes != target.num_classes:
        raise FailedPrecondition(
            f"model {source.name} has {source.num_classes} classes and {target.name} {target.num_classes}: a "
            "transfer carries class k's directions to class k, so both need the same classes"
        )
    fit = store.load_fit(source.name, source.digest)
    labels = store.list_labels(source.name, source.digest, fit_id=fit.fit_id, label=SPURIOUS)
    if classes:
        labels = [r for r in labels if r.class_index in classes]
        missing = sorted(set(classes) - {r.class_index for r in labels})
        if missing:
            raise FailedPrecondition(
                f"class(es) {missing} of model {source.name} have no component labelled spurious in fit "
                f"{fit.fit_id}; label them first (or leave them out of the transfer)"
            )
    if not labels:
        raise FailedPrecondition(
            f"model {source.name} has no component labelled spurious in fit {fit.fit_id}: nothing to transfer; "
            "label its spurious components first"
        )
    pairs = sorted((r.class_index, r.component) for r in labels)
    settings = TransferSettings(
        source_model=source.name,
        source_digest=source.digest,
        source_fit=fit.fit_id,
        classes=tuple(sorted({k for k, _ in pairs})),
        labels_snapshot=_digest(pairs, 16),
        labels=tuple(dataclasses.asdict(r) for r in sorted(labels, key=lambda r: (r.class_index, r.component))),
    )
    source_state = {"model": source.name, "digest": source.digest, "fit": fit.fit_id, "labels": pairs}
    return TransferPlan(f"transfer-{_digest(source_state, 24)}", target.name, target.digest, settings)


@dataclasses.dataclass(frozen=True)
class TransferOutcome:
    stored: StoredTransfer
    images: int  # read through the target by this run
    skipped: list[tuple[str, str]]  # (image id, why) of unreadable images
    elapsed_s: float

    def summary(self, job_id: str, target: str, digest: str) -> TransferSummary:
        settings = self.stored.settings
        return TransferSummary(job_id, self.stored.transfer_id, settings.source_model, settings.source_fit, target,
                               digest, settings.labels_snapshot, transfer_classes(self.stored), self.images,
                               len(self.skipped), self.elapsed_s)


def transfer_classes(stored: StoredTransfer) -> tuple[TransferClass, ...]:
    """Per class its directions with their covariance and floor (`transfer --json` classes)."""
    return tuple(
        TransferClass(k, moved.count, tuple(
            TransferDirection(c, float(cov), float(floor))
            for c, cov, floor in zip(moved.source_components, moved.covariance, moved.alpha_floor(DEFAULT_FLOOR_PERCENTILE))
        ))
        for k, moved in sorted(stored.classes.items())
    )


def transfer_info(stored: StoredTransfer) -> TransferInfo:
    """What GetModel says of the transfer a model applies."""
    settings = stored.settings
    labels = tuple(Label(**record).record() for record in settings.labels)
    return TransferInfo(stored.transfer_id, settings.source_model, settings.source_digest, settings.source_fit,
                        settings.labels_snapshot, labels, tuple(sorted(stored.classes)),
                        datetime.fromisoformat(stored.created))


def run_transfer(
    target: Backend,
    store: Store,
    plan: TransferPlan,
    *,
    batch_size: int | None = None,
    progress: Callable[[FitProgress], None] | None = None,
    cancel: threading.Event | None = None,
    roots: DataRoots | None = None,
    job_id: str = "",
) -> TransferOutcome:
    """Compute, store and make current the planned transfer (or make the stored one current).

    Every fit image must lie inside `roots` (default: the source fit's dataset folder). Raises
    Cancelled when `cancel` is set; the finished classes stay for the next transfer from the
    same source state. `progress` gets FitProgress under `job_id`.
    """
    started = time.monotonic()
    settings = plan.settings
    if store.has_transfer(plan.target, plan.digest, plan.transfer_id):
        store.set_current_transfer(plan.target, plan.digest, plan.transfer_id)
        return TransferOutcome(store.load_transfer(plan.target, plan.digest, plan.transfer_id), 0, [], 0.0)
    fit = store.load_fit(settings.source_model, settings.source_digest, settings.source_fit)
    root = Path(fit.meta.dataset_root)
    roots = roots or DataRoots([root])
    with store.begin_transfer(plan.target, plan.digest, plan.transfer_id, settings) as writer:
        done = set(writer.done_classes)
        todo = [k for k in settings.classes if k not in done]
        source_alphas: dict[int, np.ndarray] = {}
        rows: dict[int, dict[str, int]] = {}  # class -> image id -> its row of the source alphas
        entries: list[ImageEntry] = []
        for k in todo:
            components = fit.components(k)
            if components.alphas.shape[0] != len(components.image_ids):
                raise FailedPrecondition(f"fit {fit.fit_id} of model {settings.source_model} keeps no fit-image "
                                         f"alphas for class {k}; refit the source")
            source_alphas[k] = components.alphas[:, plan.spurious[k]]
            rows[k] = {image_id: i for i, image_id in enumerate(components.image_ids)}
            entries += [ImageEntry(root / image_id, k, image_id) for image_id in components.image_ids]
        roots.check_listing(e.path for e in entries)
        weight, _ = target.head()
        device = getattr(target, "torch_device", None)

        def report(phase: str, images_done: int) -> None:
            if progress is not None:
                progress(FitProgress(job_id, phase, images_done, len(entries), len(writer.done_classes),
                                     len(settings.classes), time.monotonic() - started))

        report("scanning", 0)
        remaining = Counter(e.class_index for e in entries)
        sums = {k: MaxCovAccumulator(weight[k], len(plan.spurious[k]), device=device) for k in todo}
        skipped: list[tuple[str, str]] = []
        images_done = 0
        with writer.scratch() as spill_dir:
            spills = {k: FeatureSpill(spill_dir, k, target.feature_dim) for k in todo}
            for batch, features in iter_features(entries, target, batch_size or target.max_batch_size, cancel,
                                                 read=roots.read):
                skipped += [(e.image_id, why) for e, why in batch.skipped]
                classes = [e.class_index for e in batch.entries]
                for k in sorted(set(classes)):
                    mine = [i for i, c in enumerate(classes) if c == k]
                    alphas = source_alphas[k][[rows[k][batch.entries[i].image_id] for i in mine]]
                    sums[k].update(features[mine], alphas)
                    spills[k].append(features[mine], ())
                for entry in [*batch.entries, *(e for e, _ in batch.skipped)]:
                    remaining[entry.class_index] -= 1
                    k = entry.class_index
                    if remaining[k] == 0:
                        _finish_class(writer, k, sums.pop(k), spills.pop(k), plan.spurious[k], weight[k])
                images_done += len(batch.entries) + len(batch.skipped)
                report("features", images_done)
            for spill in spills.values():
                spill.close()
        if sums:  # the pass stopped early
            raise Cancelled(
                f"transfer {plan.transfer_id} to model {plan.target} cancelled after {len(writer.done_classes)} of "
                f"{len(settings.classes)} classes; transfer again from the same labels to resume"
            )
        report("committing", images_done)
        stored = writer.commit()
    return TransferOutcome(stored, images_done, skipped, time.monotonic() - started)


def _finish_class(writer: TransferWriter, k: int, sums: MaxCovAccumulator, spill: FeatureSpill,
                  components: list[int], weight_row: torch.Tensor) -> None:
    """Class k's directions, and their contributions over its images (for the floor), stored."""
    features = spill.close()
    moved = sums.finalize(k, components)
    moved.alphas = alphas_chunked(lambda chunk: transfer_alphas(moved, weight_row, chunk), [spilled_rows(features)],
                                  moved.num_directions)
    del features
    spill.path.unlink()
    writer.add_class(moved)
