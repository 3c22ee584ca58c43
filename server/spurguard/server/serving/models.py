"""The models a server serves: loading and readiness, the Guard in use, the scoring path and
the entry to Visualize (its work is in visualizing.py).

Score's path: read every image's header (the request's pixel budget is checked on them), decode
per image on the shared decode pool (serving.decoding: fair across requests), batch forward
passes per model, decompose + SpuFix in the same worker thread. A request captures the Guard
once, so all its images, whichever batches they land in, are scored against one (fit, labels)
snapshot and its fit_id.
The Open Inference Protocol's ModelInfer takes the same path (its images share batches with
Score's) and gets each image's arrays (`Inference`) instead of a ScoreResult.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from spurguard.server.backends import Backend, GradientBackend, ImageInput, PreprocessConfig, TorchBackend, load_model
from spurguard.server.backends.images import OpenedImage
from spurguard.server.engine import ClassComponents
from spurguard.server.errors import InvalidInput, NotFound, Unavailable
from spurguard.server.serving.batcher import Batcher
from spurguard.server.serving.decoding import DecodePool, Tenant
from spurguard.server.serving.guard import Guard, Inference
from spurguard.server.serving.metrics import Metrics
from spurguard.server.serving.options import MAX_REQUEST_PIXELS, ScoreSettings, VisualizeSettings, check_request_pixels
from spurguard.server.serving.paths import DataRoots
from spurguard.server.serving.visualizing import visualize
from spurguard.server.store import Store
from spurguard.server.store.changes import Change
from spurguard.server.visualize.heatmap import default_gradcam_layer
from spurguard.vocab import ScoreResult, VisualizeUpdate

log = logging.getLogger("spurguard.server")

# One image to score: its input, or why it could not even be read from the request.
ImageSource = ImageInput | BaseException
# What an image's batch work returns: a ScoreResult (Score) or its row of arrays (ModelInfer).
OutputKind = Literal["result", "arrays"]
# What reading one image's header costs, in the decode pool's unit of cost (a pixel decoded or a
# byte read): measured, an open takes 20-200 us, decoding 25-85 ns a pixel. Counted so that a client whose images all fail
# at the header (forged bombs, say) is not free to flood the pool.
OPEN_COST = 4096
Scored = ScoreResult | Inference


@dataclass(frozen=True)
class _Item:
    crop: np.ndarray  # uint8 [H, W, 3]: normalised with its batch on the model's thread
    image_id: str
    guard: Guard
    options: ScoreSettings
    output: OutputKind


def _open_all(backend: Backend, sources: Sequence[ImageSource]) -> list[OpenedImage | BaseException]:
    """Each image's checked header, or the exception that says why not (never raised: per-image)."""
    opened: list[OpenedImage | BaseException] = []
    for source in sources:
        try:
            opened.append(source if isinstance(source, BaseException) else backend.open_image(source))
        except Exception as error:  # noqa: BLE001 - becomes this image's error, mapped like any other
            opened.append(error)
    return opened


def _crop(image: OpenedImage, config: PreprocessConfig) -> np.ndarray | BaseException:
    """One image's uint8 crop, or the exception that says why not (never raised: per-image)."""
    try:
        return image.crop(config)
    except Exception as error:  # noqa: BLE001 - becomes this image's error, mapped like any other
        return error


def _open_and_queue(
    pool: DecodePool, tenant: Tenant, backend: Backend, sources: Sequence[ImageSource], max_pixels: int
) -> list[Future[np.ndarray | BaseException] | BaseException]:
    """A decode-pool job: the headers, the request's pixel budget, then each image's decode
    queued. Queued from here, on the worker, so that the decodes are in the queue before this
    worker takes its next job (from the event loop, another tenant's heavy job could slip in)."""
    opened = _open_all(backend, sources)
    check_request_pixels(sum(image.pixels for image in opened if isinstance(image, OpenedImage)), max_pixels)
    config = backend.preprocess_config
    return [image if isinstance(image, BaseException) else pool.submit(tenant, image.cost, _crop, image, config)
            for image in opened]


async def _result(item: Future[np.ndarray | BaseException] | BaseException) -> np.ndarray | BaseException:
    return item if isinstance(item, BaseException) else await asyncio.wrap_future(item)


def select_forward(backend: Backend, runtime: str | None, graphs: Callable[[str, str, Callable[[Path], None]], Path]) -> None:
    """Choose where a torch model's forward-only work runs (`TorchBackend.select_runtime`) and log
    it; `graphs(name, digest, export)` keeps the exported ONNX backbone (`Store.onnx_graph`)."""
    if isinstance(backend, TorchBackend):
        choice = backend.select_runtime(runtime, lambda: graphs(backend.name, backend.digest, backend.export_onnx))
        log.info("model %s: %s", backend.name, choice.describe())


class Announcement:
    """Wakes coroutines waiting on the event loop, announced from any thread (WatchLabels' wake-up
    call when a model's labels may have changed).

    `next()` is the event the next `announce()` sets: a waiter takes it *before* reading the
    state it is about, so a change made during the read is not missed. `end()` wakes every
    waiter for good (the server stops answering), and `ended` tells them to leave."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ended = False

    def next(self) -> asyncio.Event:
        self._loop = asyncio.get_running_loop()
        return self._event

    def announce(self) -> None:
        loop = self._loop
        if loop is not None:  # None: nobody has waited yet
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
                loop.call_soon_threadsafe(self._ring)

    def end(self) -> None:
        self.ended = True
        self.announce()

    def _ring(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()


class ServedModel:
    """One model: loaded in the background, ready after warm-up, scored through a batcher."""

    def __init__(
        self,
        name: str,
        store: Store,
        metrics: Metrics,
        decode_pool: DecodePool,
        *,
        spec: str | None = None,
        backend: Backend | None = None,
        device: str = "auto",
        max_batch_size: int | None = None,
        max_delay_s: float = 0.005,
        store_poll_s: float = 0.0,
        runtime: str | None = None,
        max_request_pixels: int = MAX_REQUEST_PIXELS,
    ) -> None:
        """Give a `spec` to load (built-in name or model directory) or an already built `backend`;
        `device` and `max_batch_size` apply to loading a spec. Changes other processes make to the
        store are followed as its change feed pushes them, and by polling every `store_poll_s`
        if > 0 (see `watch_store`). `runtime` is where forward-only work runs (None: the model's
        own choice, model.toml `runtime`, by default "auto").
        `max_request_pixels`: what the images of one request may decode to, together."""
        if (spec is None) == (backend is None):
            raise ValueError("give exactly one of spec and backend")
        self.name = name
        self.spec = spec
        self.store = store
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._device = device
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._store_poll_s = store_poll_s
        self._runtime = runtime
        self._max_request_pixels = max_request_pixels
        self._watcher: asyncio.Task[None] | None = None
        self._backend = backend
        self._guard: Guard | None = None
        self._gradcam_layer: str | None = None
        self._guard_lock = threading.Lock()
        self.label_changes = Announcement()  # its labels, notes or current fit may have changed
        self.remote_serving = True  # kept by the server's health follower (rpc.app) for Triton-served models
        self._batcher: Batcher[_Item, Scored] | None = None

    @property
    def ready(self) -> bool:
        return self._batcher is not None

    @property
    def backend(self) -> Backend:
        """The backend; UNAVAILABLE while the model is still loading."""
        self._require_ready()
        assert self._backend is not None
        return self._backend

    @property
    def guard(self) -> Guard:
        """The current (fit, labels) snapshot; replaced, never changed."""
        self._require_ready()
        assert self._guard is not None
        return self._guard

    def _require_ready(self) -> None:
        if self._batcher is None:
            raise Unavailable(f"model {self.name} is loading; retry when its health status is SERVING")

    @property
    def serving(self) -> bool:
        """Loaded, and (for a model whose forward runs on Triton) Triton ready at the last check."""
        return self.ready and self.remote_serving

    def remote_ready(self) -> bool | None:
        """Whether the server its forward runs on (Triton) says the model is ready; None for a
        model whose forward runs in this process. Blocking (a network round trip)."""
        forward = getattr(self._backend, "forward", None)
        check = getattr(forward, "ready", None)
        return None if check is None else bool(check())

    @property
    def supports_gradients(self) -> bool:
        return isinstance(self._backend, GradientBackend)

    async def start(self) -> float:
        """Load (if given a spec), warm up and read the current fit; returns the seconds taken."""
        started = time.monotonic()
        await asyncio.to_thread(self._load)
        backend = self._backend
        assert backend is not None
        self._batcher = Batcher(
            self._process,
            max_batch_size=backend.max_batch_size,
            max_delay_s=self._max_delay_s,
            max_in_flight=backend.batches_in_flight,
            name=f"model-{self.name}",
            on_batch=lambda stats: self._metrics.observe_batch(self.name, stats),
        )
        if self._store_poll_s > 0 or self.store.changes is not None:
            self._watcher = asyncio.create_task(self.watch_store(), name=f"spurguard-watch-{self.name}")
        return time.monotonic() - started

    def _load(self) -> None:
        if self._backend is None:
            assert self.spec is not None
            self._backend = load_model(self.spec, self._device, self._max_batch_size)
            if self._backend.name != self.name:
                raise InvalidInput(f"model {self.spec!r} loaded as {self._backend.name!r}, expected {self.name!r}")
        select_forward(self._backend, self._runtime, self.store.onnx_graph)
        self._backend.warm_up()
        self._gradcam_layer = default_gradcam_layer(self._backend)  # before traffic: it hooks every layer
        if self.supports_gradients:
            how = f"Grad-CAM on layer {self._gradcam_layer!r}" if self._gradcam_layer else "integrated gradients"
            log.info("model %s: heatmaps use %s", self.name, how)
        self._guard = Guard.load(self._backend, self.store)

    def reload_guard(self) -> Guard:
        """Re-read the current fit and its labels (after a Label or a committed fit) and swap it in.

        Serialised, so that of two concurrent reloads the later one reads the later state.
        """
        backend = self.backend
        with self._guard_lock:
            self._guard = Guard.load(backend, self.store)
        self.label_changes.announce()
        return self._guard

    def refresh_if_stale(self) -> bool:
        """Rebuild the Guard if the store's current fit, its labels or the transfer in use differ
        from the ones it was built on; True if it did. Cheap when nothing changed: two small files
        and one query (the fit itself is only read when it changed)."""
        backend, guard = self.backend, self.guard
        fit_id = self.store.current_fit_id(backend.name, backend.digest)
        labels = {} if fit_id is None else self.store.label_map(backend.name, backend.digest, fit_id)
        transfer_id = self.store.current_transfer_id(backend.name, backend.digest)
        in_use = None if guard.transfer is None else guard.transfer.transfer_id
        if (fit_id, labels, transfer_id) == (guard.fit_id, guard.labels, in_use):
            return False
        self.reload_guard()
        return True

    async def watch_store(self) -> None:
        """Follow what other processes sharing the store do (another replica's Label or fit): the
        Guard is checked against the store and rebuilt when stale, at once when the database
        pushes a change of this model (PostgreSQL's NOTIFY: store.changes), and besides every
        `store_poll_s` (0: never) for what nobody pushes (SQLite; a fit committed by a process
        that could not notify). This server's own Label and fit calls rebuild it without waiting."""
        changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        backend = self.backend

        def on_change(change: Change | None) -> None:  # on the database's listening thread
            if change is None or (change.model, change.digest) == (backend.name, backend.digest):
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server has stopped
                    loop.call_soon_threadsafe(changed.set)

        unsubscribe = None if self.store.changes is None else self.store.changes.subscribe(on_change)
        changed.set()  # the Guard was loaded before subscribing: check once now
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self._store_poll_s or None)
                changed.clear()  # before reading: a change pushed during the check makes another round
                try:
                    if await asyncio.to_thread(self.refresh_if_stale):
                        log.info("model %s: store changed; now scoring with fit %s", self.name, self.guard.fit_id)
                except Exception as error:  # noqa: BLE001 - a store hiccup must not stop the watching
                    log.warning("model %s: could not check the store: %s", self.name, error)
                self.label_changes.announce()  # a note alone leaves the Guard as it is: watchers look again
        finally:
            if unsubscribe is not None:
                unsubscribe()

    async def score(
        self, images: Sequence[tuple[str, ImageSource]], options: ScoreSettings, tenant: Tenant | None = None
    ) -> list[ScoreResult | BaseException]:
        """One result, or the exception that failed it, per image in order (each result names its fit).
        `tenant`: whose share of the decode pool the images take (None: this call's own)."""
        return await self._submit(images, options, "result", tenant or Tenant())  # type: ignore[return-value]

    async def infer(self, images: Sequence[ImageSource], options: ScoreSettings) -> list[Inference | BaseException]:
        """Each image's row of arrays, or the exception that failed it, in order."""
        named = [(f"IMAGE[{i}]", source) for i, source in enumerate(images)]
        return await self._submit(named, options, "arrays", Tenant())  # type: ignore[return-value]

    async def _submit(
        self, images: Sequence[tuple[str, ImageSource]], options: ScoreSettings, output: OutputKind, tenant: Tenant
    ) -> list[Scored | BaseException]:
        """Headers, the pixel budget and decoding on the decode pool in `tenant`'s share, then the
        batcher (the tenant counts as in flight for the pool meanwhile); per image its output or
        its exception."""
        backend = self.backend
        guard = self.guard
        pool = self._decode_pool
        assert self._batcher is not None
        with pool.serving(tenant):
            queued = await pool.run(tenant, OPEN_COST * len(images), _open_and_queue, pool, tenant, backend,
                                    [source for _, source in images], self._max_request_pixels)
            crops = await asyncio.gather(*(_result(item) for item in queued))
            results: list[Scored | BaseException] = list(crops)  # placeholders where decoding failed
            decoded = [i for i, x in enumerate(crops) if isinstance(x, np.ndarray)]
            scored = await self._batcher.submit_many(
                [_Item(crops[i], images[i][0], guard, options, output) for i in decoded]  # type: ignore[arg-type]
            )
        for i, result in zip(decoded, scored):
            results[i] = result
        return results

    def _process(self, items: list[_Item]) -> list[Scored | BaseException]:
        """One batch in the worker thread: one forward pass, then per (guard, options, output)
        group the scores."""
        assert self._backend is not None
        features = self._backend.features(self._backend.stack_crops([item.crop for item in items]))
        results: list[Scored | BaseException] = [None] * len(items)  # type: ignore[list-item]
        groups: dict[tuple[Guard, ScoreSettings, OutputKind], list[int]] = {}
        for row, item in enumerate(items):
            groups.setdefault((item.guard, item.options, item.output), []).append(row)
        triggered: list[int] = []
        for (guard, options, output), rows in groups.items():
            try:
                scores = _score_group(guard, features[rows], [items[r].image_id for r in rows], options, output)
            except Exception as error:  # noqa: BLE001 - fails this group's images, not the batch
                scores = [error] * len(rows)
            for row, score in zip(rows, scores):
                results[row] = score
                if isinstance(score, ScoreResult) and score.trigger:
                    triggered.append(score.class_index)
                elif isinstance(score, Inference) and score.trigger[0]:
                    triggered.append(int(score.class_index[0]))
        scored = sum(not isinstance(r, BaseException) for r in results)
        self._metrics.observe_scores(self.name, scored, triggered)
        return results

    def visualize(
        self,
        components: ClassComponents,
        dataset_root: str,
        roots: DataRoots,
        options: VisualizeSettings,
        cancel: threading.Event,
    ) -> Iterator[VisualizeUpdate]:
        """Top images, heatmaps and the feature attack of one class's components (see
        visualizing.visualize); blocking, checks the request before it returns."""
        return visualize(
            self.backend,
            components,
            dataset_root,
            options,
            roots=roots,
            gradcam_layer=self._gradcam_layer,
            cancel=cancel,
            on_attack=lambda steps, seconds: self._metrics.observe_attack(self.name, steps, seconds),
        )

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._batcher is not None:
            await self._batcher.close()


def _score_group(
    guard: Guard, features: torch.Tensor, image_ids: list[str], options: ScoreSettings, output: OutputKind
) -> Sequence[Scored]:
    """One group's scores: ScoreResults, or the rows of one `Guard.infer` over the group."""
    if output == "arrays":
        arrays = guard.infer(features, class_index=options.class_index, mode=options.mode)
        return [arrays.row(i) for i in range(len(image_ids))]
    return guard.score_features(features, image_ids, class_index=options.class_index, top=options.top, mode=options.mode)


class ModelRegistry:
    """The served models by name."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self._models: dict[str, ServedModel] = {}
        for model in models:
            if model.name in self._models:
                raise InvalidInput(f"two models are named {model.name!r}; model names must be unique")
            self._models[model.name] = model

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(sorted(self._models.values(), key=lambda m: m.name))

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def get(self, name: str) -> ServedModel:
        """NOT_FOUND for a name no model has (the message lists the loaded ones)."""
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} is not served here; models: {known}") from None
