"""The data plane: every operation of the service, in vocabulary types, without protobuf.

The rpc layer's servicer only converts messages and delegates here (KServe's split of a thin
servicer over a data plane). Each method checks its request once (serving.options), then works
on the served models, the job registry and the store; blocking work (store reads, fits,
evaluations, forward passes) runs on worker threads, never on the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from spurguard import vocab
from spurguard.server.engine import DEFAULT_FLOOR_PERCENTILE
from spurguard.server.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    SpurguardError,
    error_status,
    in_context,
)
from spurguard.server.serving.decoding import Tenant
from spurguard.server.serving.evaluation import run_evaluate
from spurguard.server.serving.fitting import run_fit
from spurguard.server.serving.guard import Inference
from spurguard.server.serving.transferring import plan_transfer, run_transfer, transfer_info
from spurguard.server.serving.jobs import JobRegistry
from spurguard.server.serving.models import ImageSource, ModelRegistry, ServedModel
from spurguard.server.serving.options import (
    EvaluateSettings,
    ScoreSettings,
    VisualizeSettings,
    evaluate_settings,
    fit_request,
    score_settings,
    transfer_request,
    visualize_settings,
)
from spurguard.server.serving.paths import DataRoots
from spurguard.server.store import Fit, Label, Store
from spurguard.server.store.labels import check_filter
from spurguard.vocab import SPUFIX_MODES, UNLABELED, SpufixModeName

log = logging.getLogger("spurguard.server")


class DataPlane:
    """The service's operations over its models, store, jobs and data roots."""

    def __init__(
        self,
        models: ModelRegistry,
        store: Store,
        jobs: JobRegistry,
        roots: DataRoots,
        *,
        spufix_default: SpufixModeName = "floor",
        max_request_images: int = 1024,
        max_heavy_calls: int = 2,
        max_waiting_heavy_calls: int = 8,
    ) -> None:
        if spufix_default not in SPUFIX_MODES:
            raise InvalidInput(f"spufix default must be 'paper' or 'floor', got {spufix_default!r}")
        if max_heavy_calls < 1:
            raise InvalidInput(f"max_heavy_calls must be >= 1, got {max_heavy_calls}")
        if max_waiting_heavy_calls < 0:
            raise InvalidInput(f"max_waiting_heavy_calls must be >= 0, got {max_waiting_heavy_calls}")
        self.models = models
        self.store = store
        self.jobs = jobs
        self.roots = roots
        self.spufix_default = spufix_default
        self.max_request_images = max_request_images
        # Visualize and Evaluate each keep a worker thread busy for seconds to minutes; capped so
        # that they leave cores (and the shared thread pool) to Score. A bounded number more wait
        # their turn; beyond that a call is refused at once rather than left hanging.
        self._heavy = asyncio.Semaphore(max_heavy_calls)
        self.max_heavy_calls = max_heavy_calls
        self.max_waiting_heavy_calls = max_waiting_heavy_calls
        self._waiting_heavy = 0

    def _fitted(self, served: ServedModel, fit_id: str | None, class_index: int) -> Fit:
        """The fit (current unless named) after checking the class: NOT_FOUND out of range,
        FAILED_PRECONDITION when the fit has no components for it. Blocking (reads the store)."""
        served.guard.check_class(class_index)
        fit = self.store.load_fit(served.name, served.backend.digest, fit_id)
        if class_index not in fit:
            raise FailedPrecondition(
                f"class {class_index} of model {served.name} is not fitted in fit {fit.fit_id} "
                f"(fitted classes: {list(fit.classes)}); fit it first, e.g. Fit with extend"
            )
        return fit

    def _check_heavy_room(self, rpc: str) -> None:
        """RESOURCE_EXHAUSTED when every heavy-call slot is busy and `max_waiting_heavy_calls` wait."""
        if self._heavy.locked() and self._waiting_heavy >= self.max_waiting_heavy_calls:
            raise ResourceExhausted(
                f"{rpc}: all {self.max_heavy_calls} heavy-call slots (--max-heavy-calls) are busy and "
                f"{self._waiting_heavy} Visualize/Evaluate calls already wait (limit --max-waiting-heavy-calls "
                f"{self.max_waiting_heavy_calls}); try again later or raise the limits"
            )

    @contextlib.asynccontextmanager
    async def _heavy_slot(self, rpc: str) -> AsyncIterator[None]:
        """Hold one of the heavy-call slots for a Visualize or Evaluate, waiting for it if there
        is room to wait (`_check_heavy_room`)."""
        self._check_heavy_room(rpc)
        self._waiting_heavy += 1
        try:
            await self._heavy.acquire()
        finally:
            self._waiting_heavy -= 1
        try:
            yield
        finally:
            self._heavy.release()

    # ---- models ----

    def model_info(self, served: ServedModel, *, with_classes: bool) -> vocab.ModelInfo:
        if not served.ready:
            return vocab.ModelInfo(served.name, "", "", 0, 0, 0, "", False, False, None, (), 0, (), "")
        backend, guard = served.backend, served.guard
        classes = tuple(
            vocab.ClassInfo(k, name, wnid) for k, (name, wnid) in enumerate(zip(backend.class_names, backend.class_wnids))
        ) if with_classes else ()
        fit_classes = tuple(
            vocab.FitClass(k, guard.images[k], guard.num_components[k]) for k in guard.fitted_classes
        ) if with_classes else ()
        return vocab.ModelInfo(
            served.name, backend.kind, backend.device, backend.num_classes, backend.feature_dim, backend.input_size,
            backend.digest, True, served.supports_gradients, guard.fit_id, tuple(guard.fitted_classes),
            backend.max_batch_size, classes, backend.runtime,
            None if guard.transfer is None else transfer_info(guard.transfer), fit_classes,
        )

    def list_models(self) -> list[vocab.ModelInfo]:
        return [self.model_info(m, with_classes=False) for m in self.models]

    def get_model(self, name: str) -> vocab.ModelInfo:
        return self.model_info(self.models.get(name), with_classes=True)

    # ---- fit jobs ----

    async def fit(self, request: vocab.FitRequest) -> AsyncIterator[vocab.FitUpdate]:
        """Start (or re-attach to) a fit job and follow it."""
        served = self.models.get(request.model)
        backend = served.backend
        dataset = self.roots.resolve(request.dataset)
        request = fit_request(request, backend.num_classes)

        def work(job_id: str, progress: Callable[[vocab.FitProgress], None], cancel: threading.Event) -> vocab.FitSummary:
            assert request.num_components is not None  # fit_request filled it in
            outcome = run_fit(
                backend,
                self.store,
                dataset,
                classes=list(request.classes) or None,
                num_components=request.num_components,
                batch_size=request.batch_size,
                fit_id=job_id,
                extend=request.extend,
                progress=progress,
                cancel=cancel,
                roots=self.roots,
            )
            served.reload_guard()  # before the job reports success, so callers then see the new fit
            return outcome.summary()

        job = await self.jobs.submit(request, work)
        async for update in job.updates():
            yield update

    async def transfer(self, request: vocab.TransferRequest) -> AsyncIterator[vocab.FitUpdate]:
        """Start (or re-attach to) a transfer job and follow it (serving.transferring)."""
        source, target = self.models.get(request.source_model), self.models.get(request.target_model)
        request = transfer_request(request, source.backend.num_classes)
        plan = await asyncio.to_thread(plan_transfer, source.backend, target.backend, self.store, request.classes)

        def work(job_id: str, progress: Callable[[vocab.FitProgress], None], cancel: threading.Event) -> vocab.TransferSummary:
            outcome = run_transfer(target.backend, self.store, plan, batch_size=request.batch_size, progress=progress,
                                   cancel=cancel, roots=self.roots, job_id=job_id)
            target.reload_guard()  # before the job reports success, so callers then see the transfer
            return outcome.summary(job_id, target.name, target.backend.digest)

        job = await self.jobs.submit(request, work)
        async for update in job.updates():
            yield update

    async def watch_job(self, job_id: str) -> AsyncIterator[vocab.FitUpdate]:
        job = await self.jobs.get(job_id)
        async for update in job.updates():
            yield update

    async def get_job(self, job_id: str) -> vocab.Job:
        return (await self.jobs.get(job_id)).info()

    async def list_jobs(self, model: str | None) -> list[vocab.Job]:
        return [job.info() for job in await self.jobs.list(model)]

    async def cancel_job(self, job_id: str) -> vocab.Job:
        return (await self.jobs.cancel(job_id)).info()

    # ---- components and labels ----

    async def components(self, request: vocab.GetComponentsRequest) -> vocab.Components:
        served = self.models.get(request.model)
        return await asyncio.to_thread(self._components, served, request)

    def _components(self, served: ServedModel, request: vocab.GetComponentsRequest) -> vocab.Components:
        k = request.class_index
        fit = self._fitted(served, request.fit_id, k)
        components = fit.components(k)
        labels = {r.component: r for r in self.store.list_labels(
            served.name, served.backend.digest, fit_id=fit.fit_id, class_index=k
        )}
        count = min(request.top or components.num_components, components.num_components)
        floor = components.alpha_floor(DEFAULT_FLOOR_PERCENTILE)
        _, bias = served.backend.head()
        return vocab.Components(
            model=served.name,
            class_index=k,
            fit_id=fit.fit_id,
            images=components.count,
            num_components=components.num_components,
            floor_percentile=DEFAULT_FLOOR_PERCENTILE,
            bias_term=float(bias[k]) + float(components.mean.sum()),
            components=tuple(
                vocab.Component(
                    index=l,
                    eigenvalue=float(components.eigenvalues[l]),
                    explained_variance=float(components.explained_variance[l]),
                    alpha_mean=float(components.alpha_mean[l]),
                    alpha_floor=float(floor[l]),
                    alpha_max=float(components.alpha_max[l]),
                    label=labels[l].label if l in labels else UNLABELED,  # type: ignore[arg-type]
                    note=labels[l].note if l in labels else "",
                )
                for l in range(count)
            ),
            vectors=components.vectors[:count] if request.include_vectors else None,
            mean=components.mean if request.include_vectors else None,
        )

    async def label(self, request: vocab.LabelRequest, *, author: str) -> vocab.LabelRecord:
        """Set (or clear) one label; `author` is who asks (the caller's token name, "" without tokens)."""
        served = self.models.get(request.model)
        return (await asyncio.to_thread(self._set_label, served, request, author)).record()

    def _set_label(self, served: ServedModel, request: vocab.LabelRequest, author: str) -> Label:
        k, component = request.class_index, request.component
        fit = self._fitted(served, request.fit_id, k)
        count = fit.summary(k).num_components
        if component >= count:
            raise NotFound(
                f"component {component} does not exist: class {k} has components 0..{count - 1} in fit {fit.fit_id}"
            )
        record = self.store.set_label(
            served.name, served.backend.digest, k, component, request.label, request.note, fit_id=fit.fit_id,
            author=author,
        )
        if fit.fit_id == served.guard.fit_id:
            served.reload_guard()  # SpuFix and scores use the new label from the next request on
        else:
            served.label_changes.announce()  # an earlier fit's label: only its watchers care
        return record

    async def list_labels(self, request: vocab.ListLabelsRequest) -> vocab.LabelList:
        """A fit's labels in (class, component) order and, if asked, their history."""
        served = self.models.get(request.model)
        return await asyncio.to_thread(self._labels, served, request)

    async def watch_labels(self, request: vocab.ListLabelsRequest) -> AsyncIterator[vocab.LabelList]:
        """ListLabels' reply now, then each time it is different, until the caller leaves or the
        server stops answering (`ServedModel.label_changes`). A snapshot, not a diff: a watcher
        that missed a wake-up still ends up with the current state."""
        served = self.models.get(request.model)
        changes, last = served.label_changes, None
        while not changes.ended:
            changed = changes.next()  # before reading: a change during the read wakes us again
            current = await asyncio.to_thread(self._labels, served, request)
            if current != last:
                yield current
                last = current
            await changed.wait()

    def _labels(self, served: ServedModel, request: vocab.ListLabelsRequest) -> vocab.LabelList:
        check_filter(request.class_index, request.component)  # before the fit: a bad request is the error
        if request.class_index is None:
            fit = self.store.load_fit(served.name, served.backend.digest, request.fit_id)
        else:
            fit = self._fitted(served, request.fit_id, request.class_index)
        selected = {"fit_id": fit.fit_id, "class_index": request.class_index, "component": request.component}
        records = self.store.list_labels(served.name, served.backend.digest, label=request.label, **selected)
        history = self.store.label_history(served.name, served.backend.digest, **selected) if request.history else []
        return vocab.LabelList(fit.fit_id, tuple(r.record() for r in records),
                               tuple(r.record(written=True) for r in history))

    # ---- visualize ----

    async def visualize(self, request: vocab.VisualizeRequest) -> AsyncIterator[vocab.VisualizeUpdate]:
        """Top images, heatmaps, attack frames and results, computed as the stream is read."""
        served = self.models.get(request.model)
        settings = visualize_settings(request)
        cancel = threading.Event()
        updates = await asyncio.to_thread(self._visualization, served, request, settings, cancel)
        loop = asyncio.get_running_loop()
        async with self._heavy_slot("Visualize"):
            try:
                # Pulled item by item on a worker thread: the work advances only as the stream is sent.
                while (update := await loop.run_in_executor(None, next, updates, None)) is not None:
                    yield update
            except (asyncio.CancelledError, GeneratorExit):
                cancel.set()  # the attack, if running, stops at its next step
                log.info("Visualize %s class %d: the call ended early (client gone or server stopping); "
                         "attack cancelled", served.name, request.class_index)
                raise

    def _visualization(
        self, served: ServedModel, request: vocab.VisualizeRequest, settings: VisualizeSettings, cancel: threading.Event
    ) -> Iterator[vocab.VisualizeUpdate]:
        k = request.class_index
        fit = self._fitted(served, request.fit_id, k)
        return served.visualize(fit.components(k), fit.meta.dataset_root, self.roots, settings, cancel)

    # ---- score ----

    def _score_settings(self, served: ServedModel, options: vocab.ScoreOptions) -> ScoreSettings:
        return score_settings(options, served.backend.num_classes, self.spufix_default)

    async def score(
        self, model: str, images: Sequence[tuple[str, ImageSource]], options: vocab.ScoreOptions
    ) -> list[vocab.ScoreResult]:
        """One result per image, in order; an image that fails gets its error, the others are scored."""
        served = self.models.get(model)
        self._check_request_size(len(images), "Score")
        results = await served.score(images, self._score_settings(served, options))
        return [image_result(image_id, result, "Score") for (image_id, _), result in zip(images, results)]

    async def infer(self, model: str, images: Sequence[ImageSource], options: vocab.ScoreOptions) -> Inference:
        """The Open Inference Protocol's ModelInfer: the arrays of every image, through Score's
        batcher. OIP has no per-image errors, so the first image that fails fails the call, with
        its code and a message that says which image it was."""
        served = self.models.get(model)
        if not images:
            raise InvalidInput("the request has no images")
        self._check_request_size(len(images), "ModelInfer")
        rows = await served.infer(images, self._score_settings(served, options))
        for i, row in enumerate(rows):
            if isinstance(row, BaseException):
                raise in_context(row, "ModelInfer", f"image {i}")
        return Inference.concatenate(rows)  # type: ignore[arg-type]

    def _check_request_size(self, count: int, rpc: str) -> None:
        if count > self.max_request_images:
            raise ResourceExhausted(
                f"{count} images in one {rpc} request, over the limit of {self.max_request_images}; "
                "send smaller batches"
            )

    async def score_one(
        self, model: str, image_id: str, image: ImageSource, options: vocab.ScoreOptions, tenant: Tenant
    ) -> vocab.ScoreResult:
        """One image of a stream (`tenant`: the stream's share of the decode pool); anything wrong
        with it, even an unknown model, is its error."""
        try:
            served = self.models.get(model)
            (result,) = await served.score([(image_id, image)], self._score_settings(served, options), tenant)
        except Exception as error:  # noqa: BLE001 - this image's error, not the stream's
            result = error
        return image_result(image_id, result, "ScoreStream")

    # ---- evaluate ----

    async def evaluate(self, request: vocab.EvaluateRequest) -> AsyncIterator[vocab.EvaluateUpdate]:
        """Progress (first "queued" if other heavy calls run), then the table, kept in the store."""
        served = self.models.get(request.model)
        clean = self.roots.resolve(request.clean, "clean dataset")
        spurious = self.roots.resolve(request.spurious, "spurious dataset")
        settings = evaluate_settings(request, served.backend.num_classes, self.spufix_default)
        if settings.directions == "transferred" and served.guard.transfer is None:
            raise FailedPrecondition(f"model {served.name} applies no transfer; run Transfer to it first")
        if self._heavy.locked():
            self._check_heavy_room("Evaluate")  # refused before it says "queued"
            yield vocab.EvaluateProgress("queued", 0, 0, 0.0)
        async with self._heavy_slot("Evaluate"), contextlib.aclosing(
            self._evaluate(served, clean, spurious, settings)
        ) as updates:
            async for update in updates:
                yield update

    async def _evaluate(
        self, served: ServedModel, clean: Path, spurious: Path, settings: EvaluateSettings
    ) -> AsyncIterator[vocab.EvaluateUpdate]:
        backend = served.backend
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        work = loop.run_in_executor(None, functools.partial(
            run_evaluate, backend, served.guard.with_directions(settings.directions), clean, spurious,
            mode=settings.mode,
            classes=settings.classes,
            batch_size=settings.batch_size,
            progress=lambda p: loop.call_soon_threadsafe(updates.put_nowait, p),
            cancel=cancel,
            roots=self.roots,
        ))
        work.add_done_callback(lambda _: updates.put_nowait(None))  # after every progress put
        try:
            while (progress := await updates.get()) is not None:
                yield progress
            outcome = work.result()
            if outcome.skipped:
                image_id, why = outcome.skipped[0]
                log.warning("Evaluate %s: %d unreadable images left out (first: %s: %s)",
                            backend.name, len(outcome.skipped), image_id, why)
        finally:
            if not work.done():  # the client went away: stop at the next batch, expect Cancelled
                cancel.set()
                work.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:  # the client gets its table even if the store cannot keep a copy
            record = outcome.record(clean, spurious, settings)
            evaluation_id = await asyncio.to_thread(self.store.save_evaluation, backend.name, backend.digest, record)
        except (OSError, SpurguardError) as error:
            log.warning("Evaluate %s: could not keep the result in the store: %s", backend.name, error)
            evaluation_id = ""
        yield dataclasses.replace(outcome.result, evaluation_id=evaluation_id)


def image_result(image_id: str, result: vocab.ScoreResult | BaseException, where: str) -> vocab.ScoreResult:
    """An image's result; an exception (`where`: the RPC, for the log) becomes its error."""
    if isinstance(result, BaseException):
        status = error_status(result, where)
        return vocab.ScoreResult.failed(image_id, status.code, status.message)
    return result

