"""A fit sharded over workers (a Kubernetes Indexed Job), merged into the fit one process makes.

Shard I of N lists the whole dataset (sorted, grouped by class: the same on every machine),
takes the contiguous range [I * n // N, (I + 1) * n // N) of it, runs the backbone over it and
writes each class's partial statistics to the store (`store.shards`). Contiguous ranges keep a
shard's classes few (so its open statistics stay small) and keep every class's images in
listing order when the shards are concatenated, so the merged fit's image index is exactly the
unsharded one's.

The merge absorbs each class's parts with Chan's formula (`NeuralPCAFit.merge_class`), finalizes
the class and computes its fit-image alphas from the features the shards kept, read back a chunk
at a time. Why keep features rather than run a second pass on the shards: a second pass costs as
many forward passes again (the expensive part) and a second round of pods that must wait for the
merged eigenvectors; the features cost d float32 per image of disk, what the regular fit's
scratch holds for its open classes, and the merge's memory stays one class's d x d statistics
plus a chunk, whatever the dataset's size. The merged fit is an ordinary committed fit (classes,
manifest, current.json) under the shards' job id; the shard files are removed once it is.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spurguard.server.backends.base import Backend
from spurguard.server.datasets import ImageEntry
from spurguard.server.engine import DEFAULT_NUM_COMPONENTS, ClassStatistics, NeuralPCAFit
from spurguard.server.errors import Cancelled, FailedPrecondition, InvalidInput, NotFound
from spurguard.server.serving.fitting import (
    ALPHA_CHUNK_ROWS,
    FeatureSpill,
    FitOutcome,
    RowReader,
    commit_class,
    feature_pass,
    fit_outcome,
    list_fit_images,
    too_few_images,
)
from spurguard.server.store import FitWriter, Store
from spurguard.server.store.layout import MANIFEST, ModelPaths
from spurguard.server.store.shards import (
    ShardPart,
    ShardRecord,
    ShardSettings,
    ShardWriter,
    locked_shards,
    missing_shards,
    open_part,
    remove_shards,
    shard_name,
)
from spurguard.vocab import FitProgress

WAIT_POLL_S = 2.0  # how often a waiting merge looks for the shards still missing


def shard_range(total: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Shard I's slice [start, stop) of a listing of `total` images: contiguous, sizes within one."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise InvalidInput(f"shard {shard}/{num_shards}: need 0 <= I < N")
    return shard * total // num_shards, (shard + 1) * total // num_shards


def listing_sha256(entries: Sequence[ImageEntry]) -> str:
    """A fingerprint of the whole listing: shards that list different datasets cannot merge."""
    text = json.dumps([[e.class_index, e.image_id] for e in entries], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ShardOutcome:
    """What one shard wrote (the offline `fit --shard` prints it)."""

    fit_id: str
    model: str
    shard: int
    num_shards: int
    images: int  # of the listing in this shard
    skipped: list[tuple[str, str]]  # (image id, why) of unreadable images
    classes: list[tuple[int, int]]  # (class, readable images) of each part written
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "fit_id": self.fit_id, "model": self.model, "shard": self.shard, "num_shards": self.num_shards,
            "images": self.images, "skipped_images": len(self.skipped),
            "classes": [{"class": k, "images": n} for k, n in self.classes], "elapsed_s": self.elapsed_s,
        }


def _paths(backend: Backend, store_root: Path) -> ModelPaths:
    return ModelPaths.of(Path(store_root), backend.name, backend.digest)


def run_shard(
    backend: Backend,
    store_root: str | os.PathLike[str],
    dataset_root: str | os.PathLike[str],
    *,
    fit_id: str,
    shard: int,
    num_shards: int,
    classes: Sequence[int] | None = None,
    num_components: int = DEFAULT_NUM_COMPONENTS,
    batch_size: int | None = None,
    progress: Callable[[FitProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> ShardOutcome:
    """Run shard `shard` of `num_shards` of fit `fit_id` and write its partial statistics.

    Touches only the store's files, never its database, so N shards can run at once on one
    shared volume. A re-run replaces the shard's earlier output whole.
    """
    started = time.monotonic()
    root, entries, roots = list_fit_images(backend, dataset_root, classes, None)
    start, stop = shard_range(len(entries), shard, num_shards)
    mine = entries[start:stop]
    paths = _paths(backend, Path(store_root))
    if (paths.fit(fit_id) / MANIFEST).exists():
        raise FailedPrecondition(f"fit {fit_id} of model {backend.name} is already committed; shard a new job id")
    settings = ShardSettings(
        model=backend.name, digest=backend.digest, dataset_root=str(root), listing_sha256=listing_sha256(entries),
        images=len(entries), classes=tuple(sorted({e.class_index for e in entries})),
        num_components=num_components, feature_dim=backend.feature_dim, num_shards=num_shards,
    )
    weight, _ = backend.head()
    fit = NeuralPCAFit(weight, device=getattr(backend, "torch_device", None))
    classes_total = len({e.class_index for e in mine})
    with ShardWriter(paths, fit_id, shard, settings) as writer:

        def complete(spill: FeatureSpill) -> None:
            features = spill.close()
            if spill.rows:
                stats = fit.take_class(spill.class_index)
                kept = None if stats.rows is not None else (stats.mean.cpu().numpy(), stats.scatter.cpu().numpy())
                writer.add_part(spill.class_index, spill.image_ids, features, kept)
            spill.path.unlink()

        def on_batch(batches: int, images: int, classes_done: int) -> None:
            if progress is not None:
                progress(FitProgress(fit_id, "features", images, len(mine), classes_done, classes_total,
                                     time.monotonic() - started))

        done = feature_pass(mine, backend, fit, writer.spill_dir, complete, batch_size=batch_size or backend.max_batch_size,
                            cancel=cancel, read=roots.read, on_batch=on_batch)
        if done.unfinished:
            raise Cancelled(f"shard {shard_name(shard, num_shards)} of fit {fit_id} cancelled; run it again")
        writer.commit(len(mine), done.skipped)
        parts = [(part.class_index, part.count) for part in writer.parts]
    return ShardOutcome(fit_id, backend.name, shard, num_shards, len(mine), done.skipped, parts,
                        time.monotonic() - started)


def wait_for_shards(backend: Backend, store_root: str | os.PathLike[str], fit_id: str, num_shards: int,
                    timeout_s: float) -> None:
    """Until every shard has written its record, or `timeout_s` passed (the merge then names the missing)."""
    paths = _paths(backend, Path(store_root))
    deadline = time.monotonic() + timeout_s
    while missing_shards(paths, fit_id, num_shards) and time.monotonic() < deadline:
        time.sleep(min(WAIT_POLL_S, max(deadline - time.monotonic(), 0.0)))


def _check_request(settings: ShardSettings, dataset_root: str | os.PathLike[str] | None,
                   num_components: int | None, classes: Sequence[int] | None) -> None:
    """The merge takes its settings from the shards; any it is given must be theirs."""
    given = {
        "dataset": None if dataset_root is None else str(Path(dataset_root).resolve()),
        "components": num_components,
        "classes": None if classes is None else tuple(sorted(set(classes))),
    }
    theirs = {"dataset": settings.dataset_root, "components": settings.num_components, "classes": settings.classes}
    wrong = [f"{key} {theirs[key]!r}, not {value!r}" for key, value in given.items()
             if value is not None and value != theirs[key]]
    if wrong:
        raise FailedPrecondition(f"the shards were run with {'; '.join(wrong)}")


def merge_shards(
    backend: Backend,
    store: Store,
    *,
    fit_id: str,
    num_shards: int,
    dataset_root: str | os.PathLike[str] | None = None,
    num_components: int | None = None,
    classes: Sequence[int] | None = None,
    progress: Callable[[FitProgress], None] | None = None,
) -> FitOutcome:
    """Merge the N shards of fit `fit_id` into a committed fit (made current), then drop them.

    A merge killed midway resumes after the classes it wrote; one run again after the commit
    only makes the fit current again.
    """
    started = time.monotonic()
    paths = _paths(backend, store.root)
    try:
        committed = store.load_fit(backend.name, backend.digest, fit_id)
    except NotFound:
        committed = None
    if committed is not None:
        store.set_current(backend.name, backend.digest, fit_id)
        remove_shards(paths, fit_id)
        return fit_outcome(committed, 0, [], [], started)
    with locked_shards(paths, fit_id, num_shards) as records:
        settings = records[0].settings
        _check_request(settings, dataset_root, num_components, classes)
        skipped = [item for record in records for item in record.skipped]
        skipped_classes: list[tuple[int, str]] = []
        weight, _ = backend.head()
        fit = NeuralPCAFit(weight, device=getattr(backend, "torch_device", None))
        writer = store.begin_fit(backend.name, backend.digest, dataset_root=settings.dataset_root,
                                 num_components=settings.num_components, feature_dim=settings.feature_dim,
                                 fit_id=fit_id)
        with writer:
            done = set(writer.done_classes)
            images = len(skipped)  # as run_fit counts: the listing's images, readable or not
            for number, k in enumerate(settings.classes, 1):
                parts = [(record, record.parts[k]) for record in records if k in record.parts]
                count = sum(part.count for _, part in parts)
                if count < 2:
                    skipped_classes.append((k, too_few_images(count)))
                elif k not in done:
                    _merge_class(writer, fit, k, settings.num_components, weight[k], parts)
                    images += count
                if progress is not None:
                    progress(FitProgress(fit_id, "components", images, settings.images, number,
                                         len(settings.classes), time.monotonic() - started))
            fitted = [k for k in settings.classes if k not in {c for c, _ in skipped_classes}]
            if not fitted:
                raise InvalidInput(f"no class of {settings.dataset_root!r} had 2 readable images; nothing was fitted")
            meta = writer.commit(expected_classes=fitted)
    remove_shards(paths, fit_id)
    return fit_outcome(store.load_fit(backend.name, backend.digest, meta.fit_id), images, skipped, skipped_classes,
                       started)


def _merge_class(writer: FitWriter, fit: NeuralPCAFit, k: int, num_components: int, weight_row: torch.Tensor,
                 parts: Sequence[tuple[ShardRecord, ShardPart]]) -> None:
    """One class: its parts' statistics merged in shard order, then finalized with its alphas."""
    with ExitStack() as stack:
        opened = [(part, stack.enter_context(open_part(record, k))) for record, part in parts]
        for part, tensors in opened:
            if part.scatter:
                fit.merge_class(k, ClassStatistics.from_scatter(part.count, tensors.get_tensor("mean"),
                                                                tensors.get_tensor("scatter")))
                continue
            rows = _rows(tensors)
            for i in range(0, part.count, ALPHA_CHUNK_ROWS):
                chunk = rows(i, min(i + ALPHA_CHUNK_ROWS, part.count))
                fit.update(chunk, np.full(chunk.shape[0], k))
        image_ids = [image for part, _ in opened for image in part.image_ids]
        commit_class(writer, fit, k, num_components, weight_row, image_ids,
                     [(part.count, _rows(tensors)) for part, tensors in opened])


def _rows(tensors: Any) -> RowReader:
    """Rows [start, stop) of a part's features, read from the memory-mapped file."""
    features = tensors.get_slice("features")
    return lambda start, stop: features[start:stop]
