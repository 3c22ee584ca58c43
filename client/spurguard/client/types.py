"""Plain results of the client: frozen dataclasses, so callers never handle protobuf messages.

Enums arrive as lowercase strings, the spelling of the CLI and the store: labels "spurious",
"not_spurious", "inconsistent", "unlabeled"; SpuFix modes "paper", "floor"; job states
"queued", "running", "succeeded", "failed", "cancelled". Fields left unset by the server are
None. `to_dict()` gives the documented `--json` shape (SPEC section 3) where there is one.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Union

import numpy as np


@dataclass(frozen=True)
class ErrorInfo:
    """Why one image of a batch (or one stream message) failed while the call went on, or a job failed."""

    code: str  # gRPC status code name, e.g. "INVALID_ARGUMENT"
    message: str


@dataclass(frozen=True)
class ClassInfo:
    index: int
    name: str
    wnid: str | None


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model; `classes` is empty in `list_models()` (use `get_model()`)."""

    name: str
    backend: str
    device: str
    num_classes: int
    feature_dim: int
    input_size: int
    digest: str
    ready: bool
    supports_gradients: bool
    fit_id: str | None
    fitted_classes: tuple[int, ...]
    max_batch_size: int
    classes: tuple[ClassInfo, ...]


@dataclass(frozen=True)
class FitProgress:
    job_id: str
    phase: str
    images_done: int
    images_total: int
    classes_done: int
    classes_total: int
    elapsed_s: float


@dataclass(frozen=True)
class FitClass:
    class_index: int
    images: int
    num_components: int


@dataclass(frozen=True)
class FitSummary:
    """The last item of a fit stream: the committed fit."""

    job_id: str
    fit_id: str
    model: str
    digest: str
    images: int
    skipped_images: int
    classes: tuple[FitClass, ...]
    elapsed_s: float


FitUpdate = Union[FitProgress, FitSummary]


@dataclass(frozen=True)
class FitOptions:
    """What a fit job was started with (echoed in `Job.request`)."""

    model: str
    dataset: str
    classes: tuple[int, ...]
    num_components: int | None
    batch_size: int | None
    job_id: str | None
    extend: bool


@dataclass(frozen=True)
class Job:
    job_id: str
    model: str
    state: str
    request: FitOptions
    progress: FitProgress | None
    summary: FitSummary | None  # when state == "succeeded"
    error: ErrorInfo | None  # when state == "failed"
    created: datetime | None
    updated: datetime | None


@dataclass(frozen=True)
class Component:
    """One component's statistics: a `components --json` entry."""

    index: int
    eigenvalue: float
    explained_variance: float
    alpha_mean: float
    alpha_floor: float
    alpha_max: float
    label: str
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "eigenvalue": self.eigenvalue,
            "explained_variance": self.explained_variance,
            "alpha_mean": self.alpha_mean,
            "alpha_floor": self.alpha_floor,
            "alpha_max": self.alpha_max,
            "label": self.label,
        }


@dataclass(frozen=True)
class ClassComponents:
    """One class's components; `vectors` [L, d] and `mean` [d] only when requested."""

    model: str
    class_index: int
    fit_id: str
    images: int
    num_components: int
    floor_percentile: float
    bias_term: float
    components: tuple[Component, ...]
    vectors: np.ndarray | None
    mean: np.ndarray | None

    def to_dict(self) -> dict[str, Any]:
        """`components --json`: {model, class, images, components}."""
        return {
            "model": self.model,
            "class": self.class_index,
            "images": self.images,
            "components": [c.to_dict() for c in self.components],
        }


@dataclass(frozen=True)
class LabelRecord:
    model: str
    fit_id: str
    class_index: int
    component: int
    label: str
    note: str
    updated: datetime | None  # None for an unlabeled component


@dataclass(frozen=True)
class TopImage:
    """A fit image with one of the largest alphas of `component`."""

    component: int
    rank: int
    image: str  # path relative to the fit dataset's root
    alpha: float
    png: bytes


@dataclass(frozen=True)
class Heatmap:
    """Where `component`'s alpha comes from in the top image of the same rank."""

    component: int
    rank: int
    image: str
    alpha: float
    method: str  # "grad_cam", "integrated_gradients" or "input_gradient"
    png: bytes


@dataclass(frozen=True)
class AttackFrame:
    component: int
    step: int
    alpha: float
    prob: float
    png: bytes


@dataclass(frozen=True)
class AttackResult:
    """The final feature-attack image of `component`: its last item in a visualize stream."""

    component: int
    start_alpha: float
    final_alpha: float
    final_prob: float
    steps: int
    png: bytes


VisualizeUpdate = Union[TopImage, Heatmap, AttackFrame, AttackResult]


@dataclass(frozen=True)
class Prediction:
    class_index: int
    name: str
    prob: float
    logit: float

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.class_index, "name": self.name, "prob": self.prob, "logit": self.logit}


@dataclass(frozen=True)
class ComponentAlpha:
    index: int
    alpha: float
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "alpha": self.alpha, "label": self.label}


@dataclass(frozen=True)
class SpufixOutcome:
    mode: str
    logit: float
    predictions: tuple[Prediction, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "logit": self.logit, "predictions": [p.to_dict() for p in self.predictions]}


@dataclass(frozen=True)
class ScoreResult:
    """One image's score; when `error` is set only `image` is meaningful.

    `bias_term` and `residual` are None when the analysed class has no fitted components.
    """

    image: str
    error: ErrorInfo | None
    predictions: tuple[Prediction, ...]
    class_index: int
    logit: float
    bias_term: float | None
    residual: float | None
    components: tuple[ComponentAlpha, ...]
    spurious_alpha: float
    trigger: bool
    spufix: SpufixOutcome | None
    fit_id: str

    def to_dict(self) -> dict[str, Any]:
        """One `score --json` line; a failed image is {image, error: {code, message}}."""
        if self.error is not None:
            return {"image": self.image, "error": {"code": self.error.code, "message": self.error.message}}
        return {
            "image": self.image,
            "predictions": [p.to_dict() for p in self.predictions],
            "class": self.class_index,
            "logit": self.logit,
            "bias_term": self.bias_term,
            "residual": self.residual,
            "components": [c.to_dict() for c in self.components],
            "spurious_alpha": self.spurious_alpha,
            "trigger": self.trigger,
            "spufix": None if self.spufix is None else self.spufix.to_dict(),
        }


@dataclass(frozen=True)
class EvaluateProgress:
    phase: str
    images_done: int
    images_total: int
    elapsed_s: float


@dataclass(frozen=True)
class ClassScore:
    class_index: int
    auc: float
    ap: float
    clean_mean_prob: float
    spurious_mean_prob: float
    clean_frac_predicted: float
    spurious_frac_predicted: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.class_index,
            "auc": self.auc,
            "ap": self.ap,
            "clean_mean_prob": self.clean_mean_prob,
            "spurious_mean_prob": self.spurious_mean_prob,
            "clean_frac_predicted": self.clean_frac_predicted,
            "spurious_frac_predicted": self.spurious_frac_predicted,
        }


@dataclass(frozen=True)
class ScoreTable:
    mean_auc: float
    mean_ap: float
    classes: tuple[ClassScore, ...]
    clean_accuracy: float
    spurious_frac_predicted: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_auc": self.mean_auc,
            "mean_ap": self.mean_ap,
            "classes": [c.to_dict() for c in self.classes],
            "clean_accuracy": self.clean_accuracy,
            "spurious_frac_predicted": self.spurious_frac_predicted,
        }


@dataclass(frozen=True)
class EvaluateResult:
    """The spurious score table without (`baseline`) and with SpuFix (`spufix`, in `spufix_mode`)."""

    model: str
    fit_id: str
    baseline: ScoreTable
    spufix: ScoreTable | None
    spufix_mode: str | None
    clean_images: int
    spurious_images: int
    skipped_images: int = 0  # unreadable files, left out of both sets
    evaluation_id: str = ""  # the server's kept copy (its store's evaluations/<id>.json); "" if none

    def to_dict(self) -> dict[str, Any]:
        """`evaluate --json`: the baseline's fields, plus spufix: {mode, ...same fields}, the
        model, fit, set sizes and the kept copy's id."""
        out = self.baseline.to_dict()
        if self.spufix is not None:
            out["spufix"] = {"mode": self.spufix_mode, **self.spufix.to_dict()}
        out.update(
            model=self.model,
            fit_id=self.fit_id,
            clean_images=self.clean_images,
            spurious_images=self.spurious_images,
            skipped_images=self.skipped_images,
            evaluation_id=self.evaluation_id,
        )
        return out


EvaluateUpdate = Union[EvaluateProgress, EvaluateResult]
