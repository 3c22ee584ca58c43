"""spurguard.v1.Spurguard over grpc.aio: proto in, engine calls, proto out.

Why this shape: each RPC method only validates, translates and delegates (to the models'
scoring path, the job registry, the store); two decorators do the rest for all of them in one
place: errors to status codes (via `status_of`, so a typed error keeps its code and anything
unexpected becomes INTERNAL without a traceback on the wire) and the request metrics. Blocking
work (store reads, fits, evaluations, forward passes) never runs on the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from spurguard.server.backends import Backend
from spurguard.server.engine import DEFAULT_FLOOR_PERCENTILE, DEFAULT_NUM_COMPONENTS
from spurguard.client.cli_format import json_safe
from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound, ResourceExhausted, SpurguardError
from spurguard.server.evaluation import run_evaluate
from spurguard.server.fitting import FitProgress, run_fit
from spurguard.server.guard import Guard
from spurguard.client.types import (
    AttackFrame,
    AttackResult,
    EvaluateResult,
    Heatmap,
    Prediction,
    ScoreResult,
    ScoreTable,
    TopImage,
    VisualizeUpdate,
)
from spurguard.server.rpc.jobs import JobRegistry
from spurguard.server.rpc.metrics import Metrics
from spurguard.server.rpc.models import ImageSource, ModelRegistry, ScoreOptions, ServedModel
from spurguard.server.rpc.paths import DataRoots
from spurguard.server.rpc.status import status_of
from spurguard.server.rpc.visualizing import VisualizeOptions, visualize_options
from spurguard.server.store import Fit, Label, Store
from spurguard.server.store.store import new_id
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc

log = logging.getLogger("spurguard.server")

STREAM_WINDOW = 256  # ScoreStream messages of one stream in flight before its reading pauses
MAX_KEPT_SKIPPED = 100  # unreadable files named in a kept evaluation (all are counted)
_MODES = {pb.PAPER: "paper", pb.FLOOR: "floor"}
_MODE_VALUES = {name: value for value, name in _MODES.items()}
_LABELS = {
    pb.UNLABELED: "unlabeled",
    pb.SPURIOUS: "spurious",
    pb.NOT_SPURIOUS: "not_spurious",
    pb.INCONSISTENT: "inconsistent",
}
_LABEL_VALUES = {name: value for value, name in _LABELS.items()}
_HEATMAPS = {
    pb.HEATMAP_DEFAULT: "grad_cam",
    pb.GRAD_CAM: "grad_cam",
    pb.INPUT_GRADIENT: "input_gradient",
    pb.INTEGRATED_GRADIENTS: "integrated_gradients",
    pb.HEATMAP_NONE: "none",
}
_HEATMAP_VALUES = {  # methods a Heatmap reports
    "grad_cam": pb.GRAD_CAM,
    "input_gradient": pb.INPUT_GRADIENT,
    "integrated_gradients": pb.INTEGRATED_GRADIENTS,
}

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


# ---- the two decorators (coroutine and async-generator handlers): status codes and metrics ----


@contextlib.asynccontextmanager
async def _outcome(
    servicer: SpurguardServicer, name: str, request: object, context: grpc.aio.ServicerContext
) -> AsyncIterator[None]:
    """Around one call: any failure leaves as its status (never a traceback), and every call,
    failed, cancelled or not, is counted and timed."""
    started, code = time.monotonic(), grpc.StatusCode.OK
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as error:  # noqa: BLE001 - every failure leaves as a status, never a traceback
        status = status_of(error, name)
        code = status.code
        await context.abort(status.code, status.message)
    finally:
        servicer.observe(name, request, code, started)


def _rpc(
    method: Callable[[SpurguardServicer, _Request, grpc.aio.ServicerContext], Awaitable[_Response]],
) -> Callable[[SpurguardServicer, _Request, grpc.aio.ServicerContext], Awaitable[_Response]]:
    @functools.wraps(method)
    async def handler(self: SpurguardServicer, request: _Request, context: grpc.aio.ServicerContext) -> _Response:
        async with _outcome(self, method.__name__, request, context):
            return await method(self, request, context)
        raise AssertionError("unreachable: _outcome re-raises or aborts")

    return handler


def _rpc_stream(
    method: Callable[[SpurguardServicer, _Request, grpc.aio.ServicerContext], AsyncIterator[_Response]],
) -> Callable[[SpurguardServicer, _Request, grpc.aio.ServicerContext], AsyncIterator[_Response]]:
    @functools.wraps(method)
    async def handler(
        self: SpurguardServicer, request: _Request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[_Response]:
        async with _outcome(self, method.__name__, request, context):
            async with contextlib.aclosing(method(self, request, context)) as responses:
                async for response in responses:
                    yield response

    return handler


# ---- proto <-> engine ----


def _timestamp(iso: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(iso))
    return stamp


def _tensor(array: np.ndarray) -> pb.Tensor:
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=data.tobytes(), shape=list(data.shape))


def _spufix_mode(value: int, default: str) -> str:
    if value == pb.SPUFIX_MODE_DEFAULT:
        return default
    if value not in _MODES:
        raise InvalidInput(f"unknown SpuFix mode {value}; use PAPER, FLOOR or leave it unset")
    return _MODES[value]


def _label_name(value: int) -> str:
    if value not in _LABELS:
        raise InvalidInput(f"unknown label {value}; use UNLABELED, SPURIOUS, NOT_SPURIOUS or INCONSISTENT")
    return _LABELS[value]


def _optional(message: Any, field: str) -> Any:
    return getattr(message, field) if message.HasField(field) else None


def image_source(image: pb.Image) -> ImageSource:
    """An Image message as backend input: encoded bytes or an HxWxC array (or why it is neither)."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return image.encoded
    if kind != "raw":
        return InvalidInput("image has no data: set `encoded` (file bytes) or `raw` (pixels)")
    raw = image.raw
    if raw.channels not in (1, 3, 4):
        return InvalidInput(f"raw image has {raw.channels} channels; use 1, 3 or 4")
    expected = raw.height * raw.width * raw.channels
    if len(raw.data) != expected:
        return InvalidInput(
            f"raw image data is {len(raw.data)} bytes; {raw.height}x{raw.width}x{raw.channels} needs {expected}"
        )
    array = np.frombuffer(raw.data, np.uint8).reshape(raw.height, raw.width, raw.channels)
    return array[:, :, 0] if raw.channels == 1 else array


def _predictions(predictions: Iterable[Prediction]) -> list[pb.Prediction]:
    return [pb.Prediction(class_index=p.class_index, name=p.name, prob=p.prob, logit=p.logit) for p in predictions]


def score_result(image_id: str, result: ScoreResult | BaseException, where: str) -> pb.ScoreResult:
    """One image's ScoreResult; an exception becomes its `error`."""
    if isinstance(result, BaseException):
        status = status_of(result, where)
        return pb.ScoreResult(image_id=image_id, error=pb.ErrorStatus(code=status.number, message=status.message))
    return pb.ScoreResult(
        image_id=result.image,
        predictions=_predictions(result.predictions),
        class_index=result.class_index,
        logit=result.logit,
        bias_term=result.bias_term,
        residual=result.residual,
        components=[
            pb.ComponentAlpha(index=c.index, alpha=c.alpha, label=_LABEL_VALUES[c.label]) for c in result.components
        ],
        spurious_alpha=result.spurious_alpha,
        trigger=result.trigger,
        spufix=pb.SpufixResult(
            mode=_MODE_VALUES[result.spufix.mode],
            logit=result.spufix.logit,
            predictions=_predictions(result.spufix.predictions),
        ),
    )


def _heatmap_method(value: int) -> str:
    if value not in _HEATMAPS:
        raise InvalidInput(f"unknown heatmap method {value}; use GRAD_CAM, INTEGRATED_GRADIENTS, INPUT_GRADIENT, HEATMAP_NONE or leave it unset")
    return _HEATMAPS[value]


def _visualize_update(update: VisualizeUpdate, size: int) -> pb.VisualizeUpdate:
    """One item of the visualize work as a message; every PNG is size x size (the model input)."""
    png = pb.PngImage(data=update.png, width=size, height=size)
    if isinstance(update, TopImage):
        top = pb.TopImage(rank=update.rank, image_id=update.image, alpha=update.alpha, png=png)
        return pb.VisualizeUpdate(component=update.component, top_image=top)
    if isinstance(update, Heatmap):
        method = _HEATMAP_VALUES[update.method]
        heatmap = pb.Heatmap(rank=update.rank, image_id=update.image, alpha=update.alpha, method=method, png=png)
        return pb.VisualizeUpdate(component=update.component, heatmap=heatmap)
    if isinstance(update, AttackFrame):
        frame = pb.AttackFrame(step=update.step, alpha=update.alpha, prob=update.prob, png=png)
        return pb.VisualizeUpdate(component=update.component, frame=frame)
    assert isinstance(update, AttackResult)
    result = pb.AttackResult(start_alpha=update.start_alpha, final_alpha=update.final_alpha,
                             final_prob=update.final_prob, steps=update.steps, png=png)
    return pb.VisualizeUpdate(component=update.component, result=result)


def _label_record(record: Label) -> pb.LabelRecord:
    message = pb.LabelRecord(
        model=record.model,
        fit_id=record.fit_id,
        class_index=record.class_index,
        component=record.component,
        label=_LABEL_VALUES[record.label],
        note=record.note,
    )
    if record.label != "unlabeled" and record.updated is not None:
        message.updated.CopyFrom(_timestamp(record.updated))
    return message


def _score_table(table: ScoreTable) -> pb.ScoreTable:
    return pb.ScoreTable(
        mean_auc=table.mean_auc,
        mean_ap=table.mean_ap,
        classes=[
            pb.ClassScore(
                class_index=c.class_index,
                auc=c.auc,
                ap=c.ap,
                clean_mean_prob=c.clean_mean_prob,
                spurious_mean_prob=c.spurious_mean_prob,
                clean_frac_predicted=c.clean_frac_predicted,
                spurious_frac_predicted=c.spurious_frac_predicted,
            )
            for c in table.classes
        ],
        clean_accuracy=table.clean_accuracy,
        spurious_frac_predicted=table.spurious_frac_predicted,
    )


def _evaluate_result(result: EvaluateResult) -> pb.EvaluateResult:
    assert result.spufix is not None and result.spufix_mode is not None  # run_evaluate fills both
    return pb.EvaluateResult(
        model=result.model,
        fit_id=result.fit_id,
        baseline=_score_table(result.baseline),
        spufix=_score_table(result.spufix),
        spufix_mode=_MODE_VALUES[result.spufix_mode],
        clean_images=result.clean_images,
        spurious_images=result.spurious_images,
        skipped_images=result.skipped_images,
        evaluation_id=result.evaluation_id,
    )


def _fit_progress(progress: FitProgress) -> pb.FitProgress:
    return pb.FitProgress(
        phase=progress.phase,
        images_done=progress.images_done,
        images_total=progress.images_total,
        classes_done=progress.classes_done,
        classes_total=progress.classes_total,
    )


class SpurguardServicer(pb_grpc.SpurguardServicer):
    """The service; shares the models, store, jobs, data roots and metrics with the server."""

    def __init__(
        self,
        models: ModelRegistry,
        store: Store,
        jobs: JobRegistry,
        roots: DataRoots,
        metrics: Metrics,
        *,
        spufix_default: str = "floor",
        max_request_images: int = 1024,
        max_heavy_calls: int = 2,
    ) -> None:
        if spufix_default not in _MODE_VALUES:
            raise InvalidInput(f"spufix default must be 'paper' or 'floor', got {spufix_default!r}")
        if max_heavy_calls < 1:
            raise InvalidInput(f"max_heavy_calls must be >= 1, got {max_heavy_calls}")
        self.models = models
        self.store = store
        self.jobs = jobs
        self.roots = roots
        self.metrics = metrics
        self.spufix_default = spufix_default
        self.max_request_images = max_request_images
        # Visualize and Evaluate each keep a worker thread busy for seconds to minutes; capped so
        # that they leave cores (and the shared thread pool) to Score. More wait their turn.
        self._heavy = asyncio.Semaphore(max_heavy_calls)

    def observe(self, rpc: str, request: object, code: grpc.StatusCode, started: float) -> None:
        """Request metrics; the model label only ever names a served model."""
        model = getattr(request, "model", "")
        label = model if isinstance(model, str) and model in self.models else ""
        self.metrics.observe_request(rpc, label, code.name, time.monotonic() - started)

    def _score_options(self, options: pb.ScoreOptions) -> ScoreOptions:
        return ScoreOptions(
            class_index=_optional(options, "class_index"),
            top=_optional(options, "top"),
            mode=_spufix_mode(options.spufix, self.spufix_default),
        )

    def _fitted(self, served: ServedModel, fit_id: str | None, class_index: int) -> Fit:
        """The fit (current unless named) after checking the class: NOT_FOUND out of range,
        FAILED_PRECONDITION when the fit has no components for it. Blocking (reads the store)."""
        backend = served.backend
        served.guard.check_class(class_index)
        fit = self.store.load_fit(served.name, backend.digest, fit_id)
        if class_index not in fit:
            raise FailedPrecondition(
                f"class {class_index} of model {served.name} is not fitted in fit {fit.fit_id} "
                f"(fitted classes: {list(fit.classes)}); fit it first, e.g. Fit with extend"
            )
        return fit

    # ---- models ----

    def _model_info(self, served: ServedModel, *, with_classes: bool) -> pb.ModelInfo:
        info = pb.ModelInfo(name=served.name, ready=served.ready)
        if not served.ready:
            return info
        backend, guard = served.backend, served.guard
        info.backend = backend.kind
        info.device = backend.device
        info.num_classes = backend.num_classes
        info.feature_dim = backend.feature_dim
        info.input_size = backend.input_size
        info.digest = backend.digest
        info.supports_gradients = served.supports_gradients
        info.max_batch_size = backend.max_batch_size
        if guard.fit_id is not None:
            info.fit_id = guard.fit_id
        info.fitted_classes.extend(guard.fitted_classes)
        if with_classes:
            info.classes.extend(
                pb.ClassInfo(index=k, name=name, wnid=wnid)
                for k, (name, wnid) in enumerate(zip(backend.class_names, backend.class_wnids))
            )
        return info

    @_rpc
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(m, with_classes=False) for m in self.models])

    @_rpc
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return self._model_info(self.models.get(request.model), with_classes=True)

    # ---- fit jobs ----

    @_rpc_stream
    async def Fit(self, request: pb.FitRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.FitUpdate]:
        served = self.models.get(request.model)
        backend = served.backend
        dataset = self.roots.resolve(request.dataset)
        for k in request.classes:
            served.guard.check_class(k)
        if request.HasField("num_components") and request.num_components < 1:
            raise InvalidInput("num_components must be >= 1 (or unset for the default)")
        if request.HasField("batch_size") and request.batch_size < 1:
            raise InvalidInput(f"batch_size must be >= 1 (or unset for the model's {backend.max_batch_size})")
        job_request = pb.FitRequest()
        job_request.CopyFrom(request)
        job_request.job_id = request.job_id if request.HasField("job_id") else new_id()

        def work(job_id: str, progress: Callable[[pb.FitProgress], None], cancel: threading.Event) -> pb.FitSummary:
            outcome = run_fit(
                backend,
                self.store,
                dataset,
                classes=sorted(set(job_request.classes)) or None,
                num_components=_optional(job_request, "num_components") or DEFAULT_NUM_COMPONENTS,
                batch_size=_optional(job_request, "batch_size"),
                fit_id=job_id,
                extend=job_request.extend,
                progress=lambda p: progress(_fit_progress(p)),
                cancel=cancel,
            )
            served.reload_guard()  # before the job reports success, so callers then see the new fit
            return pb.FitSummary(
                fit_id=outcome.meta.fit_id,
                model=served.name,
                digest=outcome.meta.digest,
                images=outcome.images,
                skipped_images=len(outcome.skipped),
                classes=[pb.FitClass(class_index=c.class_index, images=c.images, num_components=c.num_components)
                         for c in outcome.classes],
                elapsed_s=outcome.elapsed_s,
            )

        job = self.jobs.submit(job_request, work)
        async for update in job.updates():
            yield update

    @_rpc_stream
    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.FitUpdate]:
        async for update in self.jobs.get(request.job_id).updates():
            yield update

    @_rpc
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return self.jobs.get(request.job_id).to_proto()

    @_rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=[job.to_proto() for job in self.jobs.list(_optional(request, "model"))])

    @_rpc
    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return self.jobs.cancel(request.job_id).to_proto()

    # ---- components and labels ----

    @_rpc
    async def GetComponents(
        self, request: pb.GetComponentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetComponentsResponse:
        served = self.models.get(request.model)
        return await asyncio.to_thread(self._components, served, request)

    def _components(self, served: ServedModel, request: pb.GetComponentsRequest) -> pb.GetComponentsResponse:
        k = request.class_index
        fit = self._fitted(served, _optional(request, "fit_id"), k)
        components = fit.components(k)
        labels = {r.component: r for r in self.store.list_labels(
            served.name, served.backend.digest, fit_id=fit.fit_id, class_index=k
        )}
        count = min(request.top or components.num_components, components.num_components)
        floor = components.alpha_floor(DEFAULT_FLOOR_PERCENTILE)
        mean, peak, share = components.alpha_mean, components.alpha_max, components.explained_variance
        _, bias = served.backend.head()
        response = pb.GetComponentsResponse(
            model=served.name,
            class_index=k,
            fit_id=fit.fit_id,
            images=components.count,
            num_components=components.num_components,
            floor_percentile=DEFAULT_FLOOR_PERCENTILE,
            bias_term=float(bias[k]) + float(components.mean.sum()),
            components=[
                pb.Component(
                    index=l,
                    eigenvalue=float(components.eigenvalues[l]),
                    explained_variance=float(share[l]),
                    alpha_mean=float(mean[l]),
                    alpha_floor=float(floor[l]),
                    alpha_max=float(peak[l]),
                    label=_LABEL_VALUES[labels[l].label] if l in labels else pb.UNLABELED,
                    note=labels[l].note if l in labels else "",
                )
                for l in range(count)
            ],
        )
        if request.include_vectors:
            response.vectors.CopyFrom(_tensor(components.vectors[:count]))
            response.mean.CopyFrom(_tensor(components.mean))
        return response

    @_rpc
    async def Label(self, request: pb.LabelRequest, context: grpc.aio.ServicerContext) -> pb.LabelRecord:
        served = self.models.get(request.model)
        label = _label_name(request.label)
        return _label_record(await asyncio.to_thread(self._set_label, served, request, label))

    def _set_label(self, served: ServedModel, request: pb.LabelRequest, label: str) -> Label:
        k, component = request.class_index, request.component
        fit = self._fitted(served, _optional(request, "fit_id"), k)
        count = fit.summary(k).num_components
        if component >= count:
            raise NotFound(
                f"component {component} does not exist: class {k} has components 0..{count - 1} in fit {fit.fit_id}"
            )
        record = self.store.set_label(
            served.name, served.backend.digest, k, component, label, request.note, fit_id=fit.fit_id
        )
        if fit.fit_id == served.guard.fit_id:
            served.reload_guard()  # SpuFix and scores use the new label from the next request on
        return record

    @_rpc
    async def ListLabels(self, request: pb.ListLabelsRequest, context: grpc.aio.ServicerContext) -> pb.ListLabelsResponse:
        served = self.models.get(request.model)
        label = _label_name(request.label) if request.HasField("label") else None
        fit_id, records = await asyncio.to_thread(self._labels, served, request, label)
        return pb.ListLabelsResponse(fit_id=fit_id, labels=[_label_record(r) for r in records])

    def _labels(self, served: ServedModel, request: pb.ListLabelsRequest, label: str | None) -> tuple[str, list[Label]]:
        class_index, fit_id = _optional(request, "class_index"), _optional(request, "fit_id")
        if class_index is None:
            fit = self.store.load_fit(served.name, served.backend.digest, fit_id)
        else:
            fit = self._fitted(served, fit_id, class_index)
        records = self.store.list_labels(
            served.name, served.backend.digest, fit_id=fit.fit_id, class_index=class_index, label=label
        )
        return fit.fit_id, records

    # ---- visualize ----

    @_rpc_stream
    async def Visualize(
        self, request: pb.VisualizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.VisualizeUpdate]:
        served = self.models.get(request.model)
        options = visualize_options(
            list(request.components),
            steps=_optional(request, "steps"),
            eps=_optional(request, "eps"),
            frame_every=_optional(request, "frame_every"),
            top_k=_optional(request, "top_k"),
            seed=request.seed,
            heatmap=_heatmap_method(request.heatmap),
            heatmap_layer=_optional(request, "heatmap_layer"),
        )
        cancel = threading.Event()
        updates = await asyncio.to_thread(self._visualization, served, request, options, cancel)
        size = served.backend.input_size
        loop = asyncio.get_running_loop()
        async with self._heavy:
            try:
                # Pulled item by item on a worker thread: the work advances only as the stream is sent.
                while (update := await loop.run_in_executor(None, next, updates, None)) is not None:
                    yield _visualize_update(update, size)
            except (asyncio.CancelledError, GeneratorExit):
                cancel.set()  # the attack, if running, stops at its next step
                log.info("Visualize %s class %d: the call ended early (client gone or server stopping); "
                         "attack cancelled", served.name, request.class_index)
                raise

    def _visualization(
        self, served: ServedModel, request: pb.VisualizeRequest, options: VisualizeOptions, cancel: threading.Event
    ) -> Iterator[VisualizeUpdate]:
        k = request.class_index
        fit = self._fitted(served, _optional(request, "fit_id"), k)
        return served.visualize(fit.components(k), fit.meta.dataset_root, options, cancel)

    # ---- score ----

    @_rpc
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        served = self.models.get(request.model)
        if len(request.images) > self.max_request_images:
            raise ResourceExhausted(
                f"{len(request.images)} images in one Score request, over the limit of "
                f"{self.max_request_images}; send smaller batches"
            )
        sources = [(image.id, image_source(image)) for image in request.images]
        fit_id, results = await served.score(sources, self._score_options(request.options))
        return pb.ScoreResponse(
            results=[score_result(image.id, r, "Score") for image, r in zip(request.images, results)],
            fit_id=fit_id or "",
        )

    @_rpc_stream
    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        replies: asyncio.Queue[pb.ScoreStreamResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)  # messages read but not yet answered on the wire

        async def answer(message: pb.ScoreStreamRequest) -> None:
            replies.put_nowait(await self._stream_reply(message))

        async def read() -> None:
            pending: set[asyncio.Task[None]] = set()
            try:
                async for message in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(answer(message))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*pending)
            except BaseException:
                for task in pending:
                    task.cancel()
                raise
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
                window.release()  # a client that stops reading replies stops its own reading too
            await reader  # a broken request stream fails the call
        finally:
            reader.cancel()

    async def _stream_reply(self, message: pb.ScoreStreamRequest) -> pb.ScoreStreamResponse:
        """One stream message's reply; anything wrong with it, even the model, is its error."""
        fit_id: str | None = None
        result: ScoreResult | BaseException
        try:
            served = self.models.get(message.model)
            fit_id, (result,) = await served.score(
                [(message.image.id, image_source(message.image))], self._score_options(message.options)
            )
        except Exception as error:  # noqa: BLE001 - this message's error, not the stream's
            result = error
        return pb.ScoreStreamResponse(
            request_id=message.request_id, result=score_result(message.image.id, result, "ScoreStream"),
            fit_id=fit_id or "",
        )

    # ---- evaluate ----

    @_rpc_stream
    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateUpdate]:
        served = self.models.get(request.model)
        backend, guard = served.backend, served.guard
        clean = self.roots.resolve(request.clean, "clean dataset")
        spurious = self.roots.resolve(request.spurious, "spurious dataset")
        mode = _spufix_mode(request.spufix, self.spufix_default)
        for k in request.classes:
            guard.check_class(k)
        if request.HasField("batch_size") and request.batch_size < 1:
            raise InvalidInput(f"batch_size must be >= 1 (or unset for the model's {backend.max_batch_size})")
        started = time.monotonic()
        if self._heavy.locked():
            yield pb.EvaluateUpdate(progress=pb.EvaluateProgress(phase="queued", elapsed_s=0.0))
        async with self._heavy, contextlib.aclosing(
            self._evaluate(request, backend, guard, clean, spurious, mode, started)
        ) as updates:
            async for update in updates:
                yield update

    async def _evaluate(
        self,
        request: pb.EvaluateRequest,
        backend: Backend,
        guard: Guard,
        clean: Path,
        spurious: Path,
        mode: str,
        started: float,
    ) -> AsyncIterator[pb.EvaluateUpdate]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        work = loop.run_in_executor(None, functools.partial(
            run_evaluate, backend, guard, clean, spurious,
            mode=mode,
            classes=list(request.classes) or None,
            batch_size=_optional(request, "batch_size"),
            progress=lambda p: loop.call_soon_threadsafe(updates.put_nowait, p),
            cancel=cancel,
        ))
        work.add_done_callback(lambda _: updates.put_nowait(None))  # after every progress put
        try:
            while (progress := await updates.get()) is not None:
                yield pb.EvaluateUpdate(progress=pb.EvaluateProgress(
                    phase=progress.phase,
                    images_done=progress.images_done,
                    images_total=progress.images_total,
                    elapsed_s=time.monotonic() - started,
                ))
            outcome = work.result()
            if outcome.skipped:
                image_id, why = outcome.skipped[0]
                log.warning("Evaluate %s: %d unreadable images left out (first: %s: %s)",
                            backend.name, len(outcome.skipped), image_id, why)
        finally:
            if not work.done():  # the client went away: stop at the next batch, expect Cancelled
                cancel.set()
                work.add_done_callback(lambda done: done.cancelled() or done.exception())
        record = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "request": {"clean": str(clean), "spurious": str(spurious), "spufix": mode,
                        "classes": list(request.classes), "batch_size": _optional(request, "batch_size")},
            **outcome.result.to_dict(),
            "skipped": [list(entry) for entry in outcome.skipped[:MAX_KEPT_SKIPPED]],
        }
        try:  # the client gets its table even if the store cannot keep a copy
            evaluation_id = await asyncio.to_thread(self.store.save_evaluation, backend.name, backend.digest, json_safe(record))
        except (OSError, SpurguardError) as error:
            log.warning("Evaluate %s: could not keep the result in the store: %s", backend.name, error)
            evaluation_id = ""
        yield pb.EvaluateUpdate(result=_evaluate_result(dataclasses.replace(outcome.result, evaluation_id=evaluation_id)))
