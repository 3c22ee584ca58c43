"""Requests checked once, where they enter the serving layer: defaults filled in, limits enforced.

Everything inside (models, guard, jobs, engine) then trusts these typed settings. A value out of
range is INVALID_ARGUMENT (NOT_FOUND for a class the model does not have), with a message that
says what is allowed; nothing a client can send reaches the engine unchecked.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from spurguard.server.engine import DEFAULT_NUM_COMPONENTS
from spurguard.server.errors import InvalidInput, NotFound, ResourceExhausted
from spurguard.server.store.store import new_id
from spurguard.server.visualize import DEFAULT_STEPS
from spurguard.vocab import (
    DEFAULT_ATTACK_PARAMETERIZATION,
    DEFAULT_HEATMAP_METHOD,
    AttackParameterizationName,
    EvaluateRequest,
    FitRequest,
    HeatmapMethodName,
    ScoreOptions,
    SpufixModeName,
    SpuriousDirectionsName,
    TransferRequest,
    VisualizeRequest,
)

MAX_COMPONENTS = 16  # per Visualize request: one attack batch, so gradient memory grows with it
MAX_STEPS = 5000  # 25x the paper's 200
MAX_TOP_K = 64
MAX_FRAMES = 1000  # attack frames per component and request
DEFAULT_TOP_K = 8
FRAMES_PER_ATTACK = 10  # frame_every unset: steps / 10
# What the images of one Score / ModelInfer request (one ScoreStream message) may decode to,
# together: the default request of 1024 images (--max-request-images) at ImageNet's 500 x 500,
# or six images at the 40 MP each may have (ImageLimits.max_pixels). Counted from the headers
# before anything is decoded; a large JPEG counts at the reduced scale it decodes at.
MAX_REQUEST_PIXELS = 256_000_000


def check_class(class_index: int, num_classes: int) -> int:
    """NOT_FOUND for a class the model does not have."""
    if not 0 <= class_index < num_classes:
        raise NotFound(f"class {class_index} does not exist: the model has classes 0..{num_classes - 1}")
    return class_index


def check_request_pixels(pixels: int, limit: int) -> None:
    """RESOURCE_EXHAUSTED for a request whose images would decode to more than `limit` pixels."""
    if pixels > limit:
        raise ResourceExhausted(
            f"the request's images decode to {pixels} pixels, over the limit of {limit} a request "
            "(--max-request-pixels); send fewer or smaller images per request"
        )


def _classes(classes: Iterable[int], num_classes: int) -> tuple[int, ...]:
    return tuple(sorted({check_class(k, num_classes) for k in classes}))


def _positive(value: int | None, what: str, default_text: str) -> int | None:
    if value is not None and value < 1:
        raise InvalidInput(f"{what} must be >= 1 (or unset for {default_text})")
    return value


@dataclass(frozen=True)
class ScoreSettings:
    """How to analyse each image of a Score request."""

    class_index: int | None  # None: each image's top-1 prediction
    top: int | None  # None: the Guard's default; 0: every kept component
    mode: SpufixModeName


def score_settings(options: ScoreOptions, num_classes: int, default_mode: SpufixModeName) -> ScoreSettings:
    if options.class_index is not None:
        check_class(options.class_index, num_classes)
    if options.top is not None and options.top < 0:
        raise InvalidInput(f"top must be >= 0, got {options.top}")
    return ScoreSettings(options.class_index, options.top, options.spufix or default_mode)


def fit_request(request: FitRequest, num_classes: int) -> FitRequest:
    """The request as the job runs it: classes sorted and checked, job id and components filled in."""
    _positive(request.num_components, "num_components", "the default")
    _positive(request.batch_size, "batch_size", "the model's max batch size")
    return replace(
        request,
        classes=_classes(request.classes, num_classes),
        num_components=request.num_components or DEFAULT_NUM_COMPONENTS,
        job_id=request.job_id or new_id(),
    )


def transfer_request(request: TransferRequest, num_classes: int) -> TransferRequest:
    """The request as the job runs it: classes sorted and checked (against both models, which
    plan_transfer requires to have the same classes), the job id filled in."""
    if request.source_model == request.target_model:
        raise InvalidInput(f"source and target are both {request.source_model!r}: a transfer goes to another model")
    _positive(request.batch_size, "batch_size", "the target's max batch size")
    return replace(request, classes=_classes(request.classes, num_classes), job_id=request.job_id or new_id())


@dataclass(frozen=True)
class EvaluateSettings:
    classes: tuple[int, ...] | None  # None: every class with spurious images
    batch_size: int | None  # None: the model's max batch size
    mode: SpufixModeName
    directions: SpuriousDirectionsName = "both"


def evaluate_settings(request: EvaluateRequest, num_classes: int, default_mode: SpufixModeName) -> EvaluateSettings:
    _positive(request.batch_size, "batch_size", "the model's max batch size")
    return EvaluateSettings(_classes(request.classes, num_classes) or None, request.batch_size,
                            request.spufix or default_mode, request.directions or "both")


@dataclass(frozen=True)
class VisualizeSettings:
    """A Visualize request's settings, checked and with defaults filled in (eps None: the engine's)."""

    components: tuple[int, ...]
    steps: int
    eps: float | None
    frame_every: int  # 0: no frames
    top_k: int
    seed: int
    heatmap: HeatmapMethodName
    heatmap_layer: str | None = None  # Grad-CAM's feature map; None: the model's default
    parameterization: AttackParameterizationName = DEFAULT_ATTACK_PARAMETERIZATION


def visualize_settings(request: VisualizeRequest) -> VisualizeSettings:
    """Check the request's limits; component indices and eps are checked against the fit and
    the model's input by the engine, before the stream's first message."""
    components = request.components
    if not components:
        raise InvalidInput("no components given; name at least one component index")
    if len(components) > MAX_COMPONENTS:
        raise InvalidInput(f"{len(components)} components in one request, over the limit of {MAX_COMPONENTS}; split it")
    repeated = [c for c, n in Counter(components).items() if n > 1]
    if repeated:
        raise InvalidInput(f"component {repeated[0]} is given more than once")
    steps = DEFAULT_STEPS if request.steps is None else request.steps
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidInput(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    frame_every = max(1, steps // FRAMES_PER_ATTACK) if request.frame_every is None else request.frame_every
    if frame_every and steps // frame_every + 1 > MAX_FRAMES:
        raise InvalidInput(
            f"frame_every {frame_every} gives {steps // frame_every + 1} frames for {steps} steps, over the limit "
            f"of {MAX_FRAMES}; use frame_every >= {math.ceil(steps / (MAX_FRAMES - 1))}"
        )
    top_k = DEFAULT_TOP_K if request.top_k is None else request.top_k
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
    heatmap = request.heatmap or DEFAULT_HEATMAP_METHOD
    if request.heatmap_layer is not None and heatmap != "grad_cam":
        raise InvalidInput(f"heatmap_layer is for grad_cam heatmaps, not {heatmap}")
    return VisualizeSettings(tuple(components), steps, request.eps, frame_every, top_k, request.seed or 0, heatmap,
                             request.heatmap_layer, request.parameterization or DEFAULT_ATTACK_PARAMETERIZATION)
