"""The engine side of Visualize: top fit images, heatmaps and the feature attack, as client items.

Why here and not in the servicer: like models.py for Score, this is the work (reading fit images
from the store's dataset root, gradients, PNG encoding), independent of protobuf. `visualize`
checks everything it can before it returns, so a bad request fails before the first message;
what it returns is a generator, so the attack advances only as fast as the stream is read (no
unbounded buffer of frames) and the cancel event stops it at its next step.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from spurguard.client import types as t
from spurguard.server.backends import Backend
from spurguard.server.backends.images import encode_png
from spurguard.server.engine import ClassComponents
from spurguard.server.errors import FailedPrecondition, InvalidInput, SpurguardError
from spurguard.server.visualize import (
    DEFAULT_STEPS,
    AttackFrame,
    AttackResult,
    component_heatmaps,
    feature_attack,
    overlay_pngs,
    read_fit_image,
    thumbnail_pngs,
    top_images,
)
from spurguard.server.visualize._objective import require_gradients
from spurguard.server.visualize.heatmap import find_layer, is_plain_module

log = logging.getLogger("spurguard.server")

MAX_COMPONENTS = 16  # per request: one attack batch, so gradient memory grows with it
MAX_STEPS = 5000  # 25x the paper's 200
MAX_TOP_K = 64
MAX_FRAMES = 1000  # attack frames per component and request
DEFAULT_TOP_K = 8
FRAMES_PER_ATTACK = 10  # frame_every unset: steps / 10
# client name -> engine name ("none": no heatmaps)
_ENGINE_METHODS = {"grad_cam": "gradcam", "integrated_gradients": "integrated_gradients", "input_gradient": "saliency"}
HEATMAPS = (*_ENGINE_METHODS, "none")
_METHOD_NAMES = {engine: client for client, engine in _ENGINE_METHODS.items()}

# Called after each attack: (model steps run, seconds of computing them).
AttackObserver = Callable[[int, float], None]


@dataclass(frozen=True)
class VisualizeOptions:
    """A Visualize request's settings, checked and with defaults filled in (eps None: the engine's)."""

    components: tuple[int, ...]
    steps: int
    eps: float | None
    frame_every: int  # 0: no frames
    top_k: int
    seed: int
    heatmap: str  # one of HEATMAPS
    heatmap_layer: str | None = None  # Grad-CAM's feature map; None: the model's default


def visualize_options(
    components: Sequence[int],
    *,
    steps: int | None,
    eps: float | None,
    frame_every: int | None,
    top_k: int | None,
    seed: int,
    heatmap: str,
    heatmap_layer: str | None = None,
) -> VisualizeOptions:
    """Check the request's limits (INVALID_ARGUMENT); eps and component indices are left to the
    engine, whose bounds depend on the model (its input size, its fit)."""
    if not components:
        raise InvalidInput("no components given; name at least one component index")
    if len(components) > MAX_COMPONENTS:
        raise InvalidInput(f"{len(components)} components in one request, over the limit of {MAX_COMPONENTS}; split it")
    repeated = [c for c, n in Counter(components).items() if n > 1]
    if repeated:
        raise InvalidInput(f"component {repeated[0]} is given more than once")
    steps = DEFAULT_STEPS if steps is None else steps
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidInput(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    frame_every = max(1, steps // FRAMES_PER_ATTACK) if frame_every is None else frame_every
    if frame_every and steps // frame_every + 1 > MAX_FRAMES:
        raise InvalidInput(
            f"frame_every {frame_every} gives {steps // frame_every + 1} frames for {steps} steps, over the limit "
            f"of {MAX_FRAMES}; use frame_every >= {math.ceil(steps / (MAX_FRAMES - 1))}"
        )
    top_k = DEFAULT_TOP_K if top_k is None else top_k
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    if heatmap not in HEATMAPS:
        raise InvalidInput(f"unknown heatmap method {heatmap!r}; use one of {', '.join(HEATMAPS)}")
    if heatmap_layer is not None and heatmap != "grad_cam":
        raise InvalidInput(f"heatmap_layer is for grad_cam heatmaps, not {heatmap}")
    return VisualizeOptions(tuple(components), steps, eps, frame_every, top_k, seed, heatmap, heatmap_layer)


def visualize(
    backend: Backend,
    components: ClassComponents,
    dataset_root: str,
    options: VisualizeOptions,
    *,
    gradcam_layer: str | None,
    cancel: threading.Event,
    on_attack: AttackObserver | None = None,
) -> Iterator[t.VisualizeUpdate]:
    """Per component its top fit images and their heatmaps, then the attack of all components as
    one batch: frames, then one result per component (its last item).

    Raises before returning for a backend without gradients (FailedPrecondition), an unknown
    component (NotFound), a bad eps or Grad-CAM layer (InvalidInput), or a layer asked of a
    backbone whose layers cannot be hooked (FailedPrecondition). Grad-CAM runs on
    `options.heatmap_layer`, else on `gradcam_layer` (the model's default); without one,
    heatmaps are integrated gradients, and each Heatmap says which it is.
    """
    if options.heatmap_layer is not None:
        module = require_gradients(backend, "heatmaps").module
        if not is_plain_module(module):
            raise FailedPrecondition(
                f"model {backend.name}'s backbone is {type(module).__name__}, whose layers cannot be hooked "
                "for Grad-CAM; ask for integrated_gradients heatmaps instead"
            )
        find_layer(module, options.heatmap_layer, backend.name)
        gradcam_layer = options.heatmap_layer
    attack = feature_attack(
        backend,
        components,
        options.components,
        eps=options.eps,
        steps=options.steps,
        frame_every=options.frame_every,
        seed=options.seed,
        cancel=cancel,
    )
    return _updates(backend, components, dataset_root, options, gradcam_layer, attack, on_attack)


def _updates(
    backend: Backend,
    components: ClassComponents,
    dataset_root: str,
    options: VisualizeOptions,
    gradcam_layer: str | None,
    attack: Iterator[AttackFrame | AttackResult],
    on_attack: AttackObserver | None,
) -> Iterator[t.VisualizeUpdate]:
    config = backend.preprocess_config
    for index in options.components:
        ranks, ids, alphas, inputs = _top_inputs(backend, components, index, dataset_root, options.top_k)
        if not ranks:
            continue
        for rank, image_id, alpha, png in zip(ranks, ids, alphas, thumbnail_pngs(inputs, config)):
            yield t.TopImage(index, rank, image_id, alpha, png)
        if options.heatmap == "none":
            continue
        heatmaps = component_heatmaps(
            backend, components, index, inputs, method=_ENGINE_METHODS[options.heatmap], layer=gradcam_layer
        )
        method = _METHOD_NAMES[heatmaps.method]
        for rank, image_id, alpha, png in zip(ranks, ids, alphas, overlay_pngs(inputs, heatmaps, config)):
            yield t.Heatmap(index, rank, image_id, alpha, method, png)

    computing = 0.0  # seconds inside the attack, not waiting for the stream's reader
    while True:
        started = time.perf_counter()
        item = next(attack, None)
        computing += time.perf_counter() - started
        if item is None:
            break
        if isinstance(item, AttackResult):
            if on_attack is not None:
                on_attack(item.steps, computing)
            for index, start, final, prob, image in zip(
                item.components, item.start_alphas, item.final_alphas, item.final_probs, item.images
            ):
                yield t.AttackResult(index, float(start), float(final), float(prob), item.steps, encode_png(image))
        else:  # an AttackFrame: one image per component, in request order
            for index, alpha, prob, image in zip(options.components, item.alphas, item.probs, item.images):
                yield t.AttackFrame(index, item.step, float(alpha), float(prob), encode_png(image))


def _top_inputs(
    backend: Backend, components: ClassComponents, index: int, root: str, k: int
) -> tuple[list[int], list[str], list[float], torch.Tensor]:
    """Ranks, ids, alphas and model inputs of the top-k fit images that can still be read.

    An image that vanished or changed since the fit is skipped with a log line (its rank stays
    unused): one missing file must not sink the whole visualisation.
    """
    ranks, ids, alphas, inputs = [], [], [], []
    for rank, top in enumerate(top_images(components, index, k)):
        try:
            pixels = backend.preprocess([read_fit_image(root, top.image_id, backend.limits)])
        except (SpurguardError, OSError) as error:
            log.warning(
                "Visualize %s class %d component %d: skipping fit image %r: %s",
                backend.name, components.class_index, index, top.image_id, error,
            )
            continue
        ranks.append(rank)
        ids.append(top.image_id)
        alphas.append(top.alpha)
        inputs.append(pixels)
    return ranks, ids, alphas, torch.cat(inputs) if inputs else torch.empty(0)
