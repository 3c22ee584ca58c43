"""Visualize's work: top fit images, heatmaps and the feature attack, as vocabulary items.

Reading fit images from the fit's dataset root (each checked against the data roots when it is
read: a fit image swapped for a link out of them fails the call), gradients, PNG encoding. `visualize`
checks everything it can before it returns, so a bad request fails before the first message;
what it returns is a generator, so the attack advances only as fast as the stream is read (no
unbounded buffer of frames) and the cancel event stops it at its next step.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import torch

from spurguard import vocab
from spurguard.server.backends import Backend
from spurguard.server.backends.images import encode_png
from spurguard.server.engine import ClassComponents
from spurguard.server.errors import FailedPrecondition, PermissionDenied, SpurguardError
from spurguard.server.serving.options import VisualizeSettings
from spurguard.server.serving.paths import DataRoots
from spurguard.server.visualize import (
    AttackFrame,
    AttackResult,
    component_heatmaps,
    feature_attack,
    fit_image_path,
    overlay_pngs,
    thumbnail_pngs,
    top_images,
)
from spurguard.server.visualize._objective import require_gradients
from spurguard.server.visualize.heatmap import find_layer, is_plain_module

log = logging.getLogger("spurguard.server")

# Called after each attack: (model steps run, seconds of computing them).
AttackObserver = Callable[[int, float], None]


def visualize(
    backend: Backend,
    components: ClassComponents,
    dataset_root: str,
    options: VisualizeSettings,
    *,
    roots: DataRoots,
    gradcam_layer: str | None,
    cancel: threading.Event,
    on_attack: AttackObserver | None = None,
) -> Iterator[vocab.VisualizeUpdate]:
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
        parameterization=options.parameterization,
    )
    return _updates(backend, components, dataset_root, roots, options, gradcam_layer, attack, on_attack)


def _updates(
    backend: Backend,
    components: ClassComponents,
    dataset_root: str,
    roots: DataRoots,
    options: VisualizeSettings,
    gradcam_layer: str | None,
    attack: Iterator[AttackFrame | AttackResult],
    on_attack: AttackObserver | None,
) -> Iterator[vocab.VisualizeUpdate]:
    config = backend.preprocess_config
    for index in options.components:
        ranks, ids, alphas, inputs = _top_inputs(backend, components, index, dataset_root, roots, options.top_k)
        if not ranks:
            continue
        for rank, image_id, alpha, png in zip(ranks, ids, alphas, thumbnail_pngs(inputs, config)):
            yield vocab.TopImage(index, rank, image_id, str(fit_image_path(dataset_root, image_id)), alpha, png)
        if options.heatmap == "none":
            continue
        heatmaps = component_heatmaps(backend, components, index, inputs, method=options.heatmap, layer=gradcam_layer)
        for rank, image_id, alpha, png in zip(ranks, ids, alphas, overlay_pngs(inputs, heatmaps, config)):
            path = str(fit_image_path(dataset_root, image_id))
            yield vocab.Heatmap(index, rank, image_id, path, alpha, heatmaps.method, png)

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
                yield vocab.AttackResult(
                    index, float(start), float(final), float(prob), item.steps, item.eps, encode_png(image),
                    item.parameterization,
                )
        else:  # an AttackFrame: one image per component, in request order
            for index, alpha, prob, image in zip(options.components, item.alphas, item.probs, item.images):
                yield vocab.AttackFrame(index, item.step, float(alpha), float(prob), encode_png(image))


def _top_inputs(
    backend: Backend, components: ClassComponents, index: int, root: str, roots: DataRoots, k: int
) -> tuple[list[int], list[str], list[float], torch.Tensor]:
    """Ranks, ids, alphas and model inputs of the top-k fit images that can still be read.

    An image that vanished or changed since the fit is skipped with a log line (its rank stays
    unused): one missing file must not sink the whole visualisation. One that now leads out of
    the data roots fails the call (PermissionDenied): that is tampering, not wear.
    """
    ranks, ids, alphas, inputs = [], [], [], []
    for rank, top in enumerate(top_images(components, index, k)):
        try:
            data = roots.read(fit_image_path(root, top.image_id), backend.limits.max_bytes, "fit image")
            pixels = backend.preprocess([data])
        except PermissionDenied:
            raise
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
