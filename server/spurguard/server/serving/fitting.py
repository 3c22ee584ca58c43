"""One pass over an image folder: features in batches -> neural PCA per class -> the store.

Why this shape: the listing is grouped by class, so a class's statistics are complete (and
finalized, written, and freed) as soon as its last image has been through the backbone. Open
state is at most the d x d scatters of the classes inside the current batch, plus each open
class's features spilled to a temporary file (they are needed once more, after its
eigenvectors are known, for the fit-image alphas). Finalizing runs on a second thread so it
overlaps the next class's forward passes. A killed or cancelled fit keeps its finished classes;
running it again with the same fit_id resumes after them.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spurguard.server.backends.base import Backend
from spurguard.server.datasets import ClassResolver, ImageEntry, list_image_folder
from spurguard.server.engine import DEFAULT_NUM_COMPONENTS, NeuralPCAFit, fit_alphas
from spurguard.server.errors import Cancelled, FailedPrecondition, InvalidInput, NotFound
from spurguard.server.loader import Reader, iter_features
from spurguard.server.serving.paths import DataRoots
from spurguard.server.store import Fit, FitMeta, FitWriter, Store
from spurguard.server.store.faults import crash_point
from spurguard.vocab import FitClass, FitProgress, FitSummary

ALPHA_CHUNK_ROWS = 4096  # fit-image features are read back this many rows at a time


@dataclass(frozen=True)
class FitOutcome:
    meta: FitMeta
    classes: list[FitClass]  # every class of the committed fit, ascending
    images: int  # images whose features went into this run
    skipped: list[tuple[str, str]]  # (image id, why) of unreadable images
    skipped_classes: list[tuple[int, str]]  # (class, why) of classes too small to fit
    elapsed_s: float

    def summary(self) -> FitSummary:
        """What the fit's job reports (the job id is the fit id)."""
        meta, carry = self.meta, self.meta.label_carry
        return FitSummary(meta.fit_id, meta.fit_id, meta.model, meta.digest, self.images, len(self.skipped),
                          tuple(self.classes), self.elapsed_s,
                          *(() if carry is None else (carry.from_fit, carry.carried, carry.not_carried)))


class FeatureSpill:
    """A class's float32 feature rows in a temporary file, appended batch by batch (a fit's and a
    transfer's: both need a class's features once more after its whole pass, and not in memory)."""

    def __init__(self, directory: Path, class_index: int, dim: int) -> None:
        self.path = directory / f"class-{class_index}.f32"
        self.class_index = class_index
        self.dim = dim
        self.rows = 0
        self.image_ids: list[str] = []
        self._file = open(self.path, "wb", buffering=0)  # one write per batch: nothing to gain from a buffer

    def append(self, features: torch.Tensor, image_ids: Sequence[str]) -> None:
        self._file.write(features.to(torch.float32).contiguous().numpy().tobytes())
        self.rows += features.shape[0]
        self.image_ids.extend(image_ids)

    def close(self) -> np.ndarray:
        """All rows, memory-mapped (read lazily)."""
        self._file.close()
        if self.rows == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.dim))


RowReader = Callable[[int, int], np.ndarray]  # (start, stop) -> feature rows [stop - start, d]


def too_few_images(count: int) -> str:
    """Why a class is skipped: without two images it has no covariance."""
    return f"{count} readable image(s); a fit needs at least 2"


def commit_class(
    writer: FitWriter,
    fit: NeuralPCAFit,
    class_index: int,
    num_components: int,
    weight_row: torch.Tensor,
    image_ids: Sequence[str],
    blocks: Sequence[tuple[int, RowReader]],
) -> None:
    """Finalize a class whose statistics are complete and persist it with its fit-image alphas,
    computed from its features (`blocks`: row counts and readers, in image_ids order) read back
    ALPHA_CHUNK_ROWS at a time, so memory does not grow with the class."""
    components = fit.finalize_class(class_index, num_components)
    components.image_ids = list(image_ids)
    components.alphas = alphas_chunked(lambda rows: fit_alphas(components, weight_row, rows), blocks,
                                       components.num_components)
    writer.add_class(components)


@dataclass(frozen=True)
class FeaturePass:
    skipped: list[tuple[str, str]]  # (image id, why) of unreadable images
    completed: int  # classes handed to `complete`
    unfinished: bool  # the pass stopped before the end (cancelled)


def feature_pass(
    entries: Sequence[ImageEntry],
    backend: Backend,
    fit: NeuralPCAFit,
    spill_dir: Path,
    complete: Callable[[FeatureSpill], None],
    *,
    batch_size: int,
    cancel: threading.Event | None,
    read: Reader,
    on_batch: Callable[[int, int, int], None],
) -> FeaturePass:
    """One pass of the backbone over `entries` (grouped by class) into `fit`, each class's
    features spilled to `spill_dir`. As soon as a class's last image is through, `complete(spill)`
    runs on a second thread, overlapping the next forward passes. `on_batch(batches, images,
    classes completed)` follows every batch."""
    remaining = Counter(e.class_index for e in entries)
    skipped: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spurguard-finalize") as finalizer:
        spills: dict[int, FeatureSpill] = {}
        pending: list[Future[None]] = []
        images = 0
        for batches, (batch, features) in enumerate(iter_features(entries, backend, batch_size, cancel, read=read), 1):
            skipped.extend((entry.image_id, why) for entry, why in batch.skipped)
            labels = torch.tensor([e.class_index for e in batch.entries], dtype=torch.int64)
            if batch.entries:
                fit.update(features, labels)
            seen = batch.entries + [entry for entry, _ in batch.skipped]
            for entry in seen:
                remaining[entry.class_index] -= 1
            for k in sorted({entry.class_index for entry in seen}):
                rows = (labels == k).nonzero().squeeze(1)
                if k not in spills:
                    spills[k] = FeatureSpill(spill_dir, k, backend.feature_dim)
                spill = spills[k]
                spill.append(features[rows], [batch.entries[i].image_id for i in rows.tolist()])
                if remaining[k] == 0:
                    pending.append(finalizer.submit(complete, spills.pop(k)))
            images += len(seen)
            on_batch(batches, images, sum(future.done() for future in pending))
            _raise_failed(pending)
        for future in pending:
            future.result()
        unfinished = bool(spills) or any(remaining.values())
        for spill in spills.values():
            spill.close()
    return FeaturePass(skipped, len(pending), unfinished)


def alphas_chunked(
    alphas: Callable[[np.ndarray], np.ndarray], blocks: Sequence[tuple[int, RowReader]], columns: int
) -> np.ndarray:
    """`alphas` of feature rows (`blocks`: row counts and readers, in order) read back
    ALPHA_CHUNK_ROWS at a time, so memory does not grow with the class: [n, columns] float32."""
    parts = [alphas(read(i, min(i + ALPHA_CHUNK_ROWS, rows))) for rows, read in blocks
             for i in range(0, rows, ALPHA_CHUNK_ROWS)]
    return np.concatenate(parts) if parts else np.zeros((0, columns), np.float32)


def spilled_rows(features: np.ndarray) -> tuple[int, RowReader]:
    """A spill's features (a memory map) as one block for `alphas_chunked`."""
    return features.shape[0], lambda start, stop: np.array(features[start:stop])


def _open_writer(
    backend: Backend,
    store: Store,
    root: Path,
    num_components: int,
    fit_id: str | None,
    extend: bool,
) -> tuple[FitWriter, bool]:
    """The writer, and whether it resumes an unfinished fit (whose done classes are skipped)."""
    resuming = fit_id is not None and fit_id in store.pending_fits(backend.name, backend.digest)
    if not extend:
        writer = store.begin_fit(
            backend.name,
            backend.digest,
            dataset_root=root,
            num_components=num_components,
            feature_dim=backend.feature_dim,
            fit_id=fit_id,
        )
        return writer, resuming
    if resuming:
        return store.resume_fit(backend.name, backend.digest, fit_id), True
    base = store.current_fit_id(backend.name, backend.digest)
    if base is None:
        raise FailedPrecondition(f"model {backend.name} has no fit to extend; run a fit without extend first")
    meta = store.load_fit(backend.name, backend.digest, base).meta
    if Path(meta.dataset_root) != root:
        raise FailedPrecondition(
            f"extend adds classes from the current fit's dataset {meta.dataset_root!r}, not {str(root)!r}"
        )
    if meta.num_components != num_components:
        raise FailedPrecondition(
            f"the current fit keeps {meta.num_components} components per class; extend with the same number"
        )
    return store.extend_fit(backend.name, backend.digest, fit_id=fit_id), False


def _committed(backend: Backend, store: Store, root: Path, num_components: int, fit_id: str | None) -> Fit | None:
    """The committed fit of this id, if there is one: a run killed between writing the manifest
    and switching current.json left it so, and running it again finishes that step."""
    if fit_id is None:
        return None
    try:
        fit = store.load_fit(backend.name, backend.digest, fit_id)
    except NotFound:
        return None
    if Path(fit.meta.dataset_root) != root or fit.meta.num_components != num_components:
        raise FailedPrecondition(
            f"fit {fit_id} is already committed, over {fit.meta.dataset_root!r} with {fit.meta.num_components} "
            "components per class; choose another job id for other settings"
        )
    return fit


def list_fit_images(
    backend: Backend, dataset_root: str | os.PathLike[str], classes: Sequence[int] | None, roots: DataRoots | None
) -> tuple[Path, list[ImageEntry], DataRoots]:
    """The resolved dataset folder, its images grouped by class, and the roots they were checked
    against (default: the folder itself): a link out of them refuses the fit (PermissionDenied)."""
    root = Path(dataset_root).resolve()
    entries = list_image_folder(root, ClassResolver(backend.class_names, backend.class_wnids), classes)
    if roots is None:
        roots = DataRoots([root])
    roots.check_listing(e.path for e in entries)
    return root, entries, roots


def run_fit(
    backend: Backend,
    store: Store,
    dataset_root: str | os.PathLike[str],
    *,
    classes: Sequence[int] | None = None,
    num_components: int = DEFAULT_NUM_COMPONENTS,
    batch_size: int | None = None,
    fit_id: str | None = None,
    extend: bool = False,
    progress: Callable[[FitProgress], None] | None = None,
    cancel: threading.Event | None = None,
    roots: DataRoots | None = None,
) -> FitOutcome:
    """Fit the classes' components over `dataset_root/<class>/<image>` and commit the fit.

    Every image must lie inside `roots` (default: the dataset folder itself): a link out of them
    refuses the whole fit before anything is read (PermissionDenied).

    Raises Cancelled when `cancel` is set; the finished classes stay for a resume with the same
    fit_id. A class with fewer than 2 readable images has no covariance: it is skipped and named
    in `skipped_classes`, the others are committed. `progress` gets FitProgress under the fit id.
    """
    started = time.monotonic()
    batch_size = batch_size or backend.max_batch_size
    root, entries, roots = list_fit_images(backend, dataset_root, classes, roots)
    selected = sorted({e.class_index for e in entries})
    committed = _committed(backend, store, root, num_components, fit_id)
    if committed is not None:
        store.set_current(backend.name, backend.digest, committed.fit_id)
        return fit_outcome(committed, 0, [], [], started)
    writer, resuming = _open_writer(backend, store, root, num_components, fit_id, extend)

    def report(phase: str, images_done: int, classes_done: int) -> None:
        if progress is not None:
            elapsed = time.monotonic() - started
            progress(FitProgress(writer.fit_id, phase, images_done, len(entries), classes_done, len(selected), elapsed))

    report("scanning", 0, 0)
    with writer:
        skip = set(writer.done_classes) if resuming else set()
        todo = [e for e in entries if e.class_index not in skip]
        images_done = len(entries) - len(todo)
        weight, _ = backend.head()
        # The statistics and eigensolves live where the backbone runs (CUDA where it does).
        fit = NeuralPCAFit(weight, device=getattr(backend, "torch_device", None))
        skipped_classes: list[tuple[int, str]] = []
        already_done = len(skip & set(selected))

        def finalize(spill: FeatureSpill) -> None:
            k, features = spill.class_index, spill.close()
            if spill.rows < 2:
                skipped_classes.append((k, too_few_images(spill.rows)))
                if spill.rows:
                    fit.take_class(k)  # frees the statistics
            else:
                commit_class(writer, fit, k, num_components, weight[k], spill.image_ids, [spilled_rows(features)])
            spill.path.unlink()

        def on_batch(batches: int, images: int, classes: int) -> None:
            crash_point("batch", writer.fit_id, batches)
            report("features", images_done + images, already_done + classes)

        with writer.scratch() as spill_dir:
            done = feature_pass(todo, backend, fit, spill_dir, finalize, batch_size=batch_size, cancel=cancel,
                                read=roots.read, on_batch=on_batch)
        if done.unfinished:
            raise Cancelled(
                f"fit {writer.fit_id} of model {backend.name} cancelled after {already_done + done.completed} of "
                f"{len(selected)} classes; fit again with job/fit id {writer.fit_id} to resume"
            )
        report("committing", len(entries), already_done + done.completed)
        written = set(writer.done_classes)
        fitted = [k for k in selected if k in written]
        if not fitted:
            raise InvalidInput(f"no class of {str(root)!r} had 2 readable images; nothing was fitted")
        meta = writer.commit(expected_classes=fitted)
    return fit_outcome(store.load_fit(backend.name, backend.digest, meta.fit_id), len(todo), done.skipped,
                    skipped_classes, started)


def fit_outcome(
    fit: Fit, images: int, skipped: list[tuple[str, str]], skipped_classes: list[tuple[int, str]], started: float
) -> FitOutcome:
    classes = [FitClass(k, fit.summary(k).count, fit.summary(k).num_components) for k in fit.classes]
    return FitOutcome(fit.meta, classes, images, skipped, skipped_classes, time.monotonic() - started)


def _raise_failed(pending: list[Future[None]]) -> None:
    """Surface a finalizer error now rather than after the whole pass."""
    for future in pending:
        if future.done():
            future.result()
