"""The models a server serves: loading and readiness, the Guard in use, the scoring path and
the entry to Visualize (its work is in visualizing.py).

Score's path: decode per image on a thread pool, batch forward passes per model, decompose +
SpuFix in the same worker thread. A request captures the Guard once, so all its images,
whichever batches they land in, are scored against one (fit, labels) snapshot and its fit_id.
The Open Inference Protocol's ModelInfer takes the same path (its images share batches with
Score's) and gets each image's arrays (`Inference`) instead of a ScoreResult.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from spurguard.server.backends import Backend, GradientBackend, ImageInput, TorchBackend, load_model
from spurguard.server.engine import ClassComponents
from spurguard.server.errors import InvalidInput, NotFound, Unavailable
from spurguard.server.serving.batcher import Batcher
from spurguard.server.serving.guard import Guard, Inference
from spurguard.server.serving.metrics import Metrics
from spurguard.server.serving.options import ScoreSettings, VisualizeSettings
from spurguard.server.serving.paths import DataRoots
from spurguard.server.serving.visualizing import visualize
from spurguard.server.store import Store
from spurguard.server.visualize.heatmap import default_gradcam_layer
from spurguard.vocab import ScoreResult, VisualizeUpdate

log = logging.getLogger("spurguard.server")

# One image to score: its input, or why it could not even be read from the request.
ImageSource = ImageInput | BaseException
# What an image's batch work returns: a ScoreResult (Score) or its row of arrays (ModelInfer).
OutputKind = Literal["result", "arrays"]
Scored = ScoreResult | Inference


@dataclass(frozen=True)
class _Item:
    crop: np.ndarray  # uint8 [H, W, 3]: normalised with its batch on the model's thread
    image_id: str
    guard: Guard
    options: ScoreSettings
    output: OutputKind


def _decode_crop(backend: Backend, source: ImageSource) -> np.ndarray | BaseException:
    """One image's uint8 crop, or the exception that says why not (never raised: per-image)."""
    if isinstance(source, BaseException):
        return source
    try:
        return backend.decode_crop(source)
    except Exception as error:  # noqa: BLE001 - becomes this image's error, mapped like any other
        return error


class ServedModel:
    """One model: loaded in the background, ready after warm-up, scored through a batcher."""

    def __init__(
        self,
        name: str,
        store: Store,
        metrics: Metrics,
        decode_pool: Executor,
        *,
        spec: str | None = None,
        backend: Backend | None = None,
        device: str = "auto",
        max_batch_size: int | None = None,
        max_delay_s: float = 0.005,
        store_poll_s: float = 0.0,
        runtime: str | None = None,
    ) -> None:
        """Give a `spec` to load (built-in name or model directory) or an already built `backend`;
        `device` and `max_batch_size` apply to loading a spec. `store_poll_s` > 0 follows changes
        other processes make to the store (see `watch_store`). `runtime` is where forward-only
        work runs (None: the model's own choice, model.toml `runtime`, by default "auto")."""
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
        self._watcher: asyncio.Task[None] | None = None
        self._backend = backend
        self._guard: Guard | None = None
        self._gradcam_layer: str | None = None
        self._guard_lock = threading.Lock()
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
        if self._store_poll_s > 0:
            self._watcher = asyncio.create_task(self.watch_store(self._store_poll_s), name=f"spurguard-watch-{self.name}")
        return time.monotonic() - started

    def _load(self) -> None:
        if self._backend is None:
            assert self.spec is not None
            self._backend = load_model(self.spec, self._device, self._max_batch_size)
            if self._backend.name != self.name:
                raise InvalidInput(f"model {self.spec!r} loaded as {self._backend.name!r}, expected {self.name!r}")
        backend = self._backend
        if isinstance(backend, TorchBackend):
            choice = backend.select_runtime(
                self._runtime, lambda: self.store.onnx_graph(backend.name, backend.digest, backend.export_onnx)
            )
            log.info("model %s: %s", self.name, choice.describe())
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

    async def watch_store(self, interval_s: float) -> None:
        """Follow what other processes sharing the store do (another replica's Label or fit):
        every `interval_s` the Guard is checked against the store and rebuilt when stale, so
        replicas agree within about that time. This server's own Label and fit calls rebuild
        it at once without waiting."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await asyncio.to_thread(self.refresh_if_stale):
                    log.info("model %s: store changed; now scoring with fit %s", self.name, self.guard.fit_id)
            except Exception as error:  # noqa: BLE001 - a store hiccup must not stop the watching
                log.warning("model %s: could not check the store: %s", self.name, error)

    async def score(
        self, images: Sequence[tuple[str, ImageSource]], options: ScoreSettings
    ) -> list[ScoreResult | BaseException]:
        """One result, or the exception that failed it, per image in order (each result names its fit)."""
        return await self._submit(images, options, "result")  # type: ignore[return-value]

    async def infer(self, images: Sequence[ImageSource], options: ScoreSettings) -> list[Inference | BaseException]:
        """Each image's row of arrays, or the exception that failed it, in order."""
        named = [(f"IMAGE[{i}]", source) for i, source in enumerate(images)]
        return await self._submit(named, options, "arrays")  # type: ignore[return-value]

    async def _submit(
        self, images: Sequence[tuple[str, ImageSource]], options: ScoreSettings, output: OutputKind
    ) -> list[Scored | BaseException]:
        """Decode on the pool, then through the batcher; per image its output or its exception."""
        backend = self.backend
        guard = self.guard
        loop = asyncio.get_running_loop()
        crops = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, _decode_crop, backend, source) for _, source in images)
        )
        results: list[Scored | BaseException] = list(crops)  # placeholders where decoding failed
        decoded = [i for i, x in enumerate(crops) if isinstance(x, np.ndarray)]
        assert self._batcher is not None
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
