"""The result vocabulary: what a spurguard call returns, as frozen dataclasses both sides share.

The server builds these, spurguard.wire carries them over gRPC, and the client hands the same
types to its callers. Names are the proto's: a class and its fields are spelled like the
message and its fields (spurguard.wire converts by name), except `Components`, the
GetComponents reply (the engine's ClassComponents is the stored fit), and `LabelList`, the
ListLabels reply. Enumerations are the
lowercase strings of `names`; a field the server left unset is None. `to_dict()` gives each
type's documented `--json` shape (SPEC §3).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Union

import numpy as np

from spurguard.vocab.names import (
    AttackParameterizationName,
    HeatmapMethodName,
    JobKindName,
    JobStateName,
    LabelName,
    SpufixModeName,
    SpuriousDirectionsName,
)
from spurguard.vocab.requests import FitRequest, TransferRequest


class Result:
    """What every result has: its `--json` shape."""

    def to_dict(self) -> Any:
        """The documented `--json` shape (SPEC §3): `jsonshape.to_json`, where every shape is defined."""
        from spurguard.vocab.jsonshape import to_json  # a module-level import would be circular

        return to_json(self)


@dataclass(frozen=True)
class ErrorStatus(Result):
    """Why one image of a batch (or one stream message) failed while the call went on, or a job failed."""

    code: str  # gRPC status code name, e.g. "INVALID_ARGUMENT"
    message: str


# ---- models ----


@dataclass(frozen=True)
class ClassInfo(Result):
    index: int
    name: str
    wnid: str | None


@dataclass(frozen=True)
class ModelInfo(Result):
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
    runtime: str = ""  # where forward-only work runs: "torch", "onnxruntime", "openvino"
    transfer: TransferInfo | None = None  # the transfer Score / Evaluate / SpuFix apply; None: none
    fit_classes: tuple[FitClass, ...] = ()  # get_model() only: the current fit's classes, images, components kept


# ---- fit jobs ----



@dataclass(frozen=True)
class FitProgress(Result):
    job_id: str
    phase: str  # "queued", "scanning", "features", "components", "committing"
    images_done: int
    images_total: int
    classes_done: int
    classes_total: int
    elapsed_s: float


@dataclass(frozen=True)
class FitClass(Result):
    class_index: int
    images: int
    num_components: int


@dataclass(frozen=True)
class LabelCarried(Result):
    """A label of the fit a refit replaced, now on the new fit's best-matching component."""

    class_index: int
    from_component: int
    to_component: int
    label: LabelName
    cos: float  # |cos| between the two eigenvectors (>= 0.95)


@dataclass(frozen=True)
class LabelNotCarried(Result):
    """A label of the replaced fit that no component of the new fit matches: it stays on the old fit."""

    class_index: int
    component: int
    label: LabelName
    best_cos: float  # the best |cos| over the new fit's components of that class (0: class not in it)
    reason: str


@dataclass(frozen=True)
class FitSummary(Result):
    """The last item of a fit stream: the committed fit, and what became of the labels of the fit
    it replaced (SPEC §1 Labels: nothing is dropped silently)."""

    job_id: str
    fit_id: str
    model: str
    digest: str
    images: int
    skipped_images: int
    classes: tuple[FitClass, ...]
    elapsed_s: float
    labels_from_fit: str = ""  # the fit whose labels were carried ("" when none was current)
    labels_carried: tuple[LabelCarried, ...] = ()
    labels_not_carried: tuple[LabelNotCarried, ...] = ()


# ---- transfer ----


@dataclass(frozen=True)
class TransferDirection(Result):
    source_component: int
    covariance: float  # cov(alpha_l, <a', d_l>) over the images: the maximum max_cov reached
    alpha_floor: float


@dataclass(frozen=True)
class TransferClass(Result):
    class_index: int
    images: int
    directions: tuple[TransferDirection, ...]


@dataclass(frozen=True)
class TransferSummary(Result):
    """The last item of a transfer stream: `transfer --json`."""

    job_id: str
    transfer_id: str
    source_model: str
    source_fit: str
    target_model: str
    target_digest: str
    labels_snapshot: str
    classes: tuple[TransferClass, ...]
    images: int  # read through the target by this run (0: the transfer was already stored)
    skipped_images: int
    elapsed_s: float


@dataclass(frozen=True)
class LabelRecord(Result):
    model: str
    fit_id: str
    class_index: int
    component: int
    label: LabelName
    note: str
    updated: datetime | None  # None for an unlabeled component (a write in a history always has it)
    author: str = ""  # the token name that set it; "" on a server without tokens


@dataclass(frozen=True)
class LabelList(Result):
    """A ListLabels reply: one fit's labels by (class, component), and (when asked) `history`,
    every write of the selected components, oldest first."""

    fit_id: str
    labels: tuple[LabelRecord, ...]
    history: tuple[LabelRecord, ...] = ()


@dataclass(frozen=True)
class TransferInfo(Result):
    """The transfer a model applies: from which source fit and which labels (as they were then)."""

    transfer_id: str
    source_model: str
    source_digest: str
    source_fit: str
    labels_snapshot: str
    labels: tuple[LabelRecord, ...]
    classes: tuple[int, ...]
    created: datetime | None


FitUpdate = Union[FitProgress, FitSummary, TransferSummary]  # WatchJob of a transfer ends with its summary
TransferUpdate = Union[FitProgress, TransferSummary]


@dataclass(frozen=True)
class Job(Result):
    job_id: str
    model: str  # a transfer's target model
    state: JobStateName
    request: FitRequest | None  # a fit job's request
    progress: FitProgress | None
    summary: FitSummary | None  # a fit job, when state == "succeeded"
    error: ErrorStatus | None  # when state == "failed" or "cancelled"
    created: datetime | None
    updated: datetime | None
    kind: JobKindName = "fit"
    transfer: TransferRequest | None = None  # a transfer job's request
    transfer_summary: TransferSummary | None = None  # a transfer job, when state == "succeeded"


# ---- components and labels ----


@dataclass(frozen=True)
class Component(Result):
    """One component's statistics: a `components --json` entry."""

    index: int
    eigenvalue: float
    explained_variance: float
    alpha_mean: float
    alpha_floor: float
    alpha_max: float
    label: LabelName
    note: str


@dataclass(frozen=True)
class Components(Result):
    """One class's components in one fit; `vectors` [L, d] and `mean` [d] only when requested."""

    model: str
    class_index: int
    fit_id: str
    images: int
    num_components: int
    floor_percentile: float
    bias_term: float
    components: tuple[Component, ...]
    vectors: np.ndarray | None = None
    mean: np.ndarray | None = None


# ---- visualize ----



@dataclass(frozen=True)
class TopImage(Result):
    """A fit image with one of the largest alphas of `component`."""

    component: int
    rank: int
    image_id: str  # relative to the fit dataset's root
    path: str  # the file the server read: the fit's dataset root joined with image_id
    alpha: float
    png: bytes


@dataclass(frozen=True)
class Heatmap(Result):
    """Where `component`'s alpha comes from in the top image of the same rank."""

    component: int
    rank: int
    image_id: str
    path: str
    alpha: float
    method: HeatmapMethodName  # never "none"
    png: bytes


@dataclass(frozen=True)
class AttackFrame(Result):
    component: int
    step: int
    alpha: float
    prob: float
    png: bytes


@dataclass(frozen=True)
class AttackResult(Result):
    """The final feature-attack image of `component`: its last item in a visualize stream."""

    component: int
    start_alpha: float
    final_alpha: float
    final_prob: float
    steps: int
    eps: float  # the L2 radius the attack ran with (the server's default where none was asked)
    png: bytes
    parameterization: AttackParameterizationName | None = None  # what it ran with; None: a server that does not say


VisualizeUpdate = Union[TopImage, Heatmap, AttackFrame, AttackResult]


# ---- score ----



@dataclass(frozen=True)
class Prediction(Result):
    class_index: int
    name: str
    prob: float
    logit: float


@dataclass(frozen=True)
class ComponentAlpha(Result):
    index: int
    alpha: float
    label: LabelName
    source: str = ""  # "MODEL/FIT_ID/CLASS/COMPONENT" for a transferred direction; "" for an own component


@dataclass(frozen=True)
class SpufixResult(Result):
    mode: SpufixModeName
    logit: float
    predictions: tuple[Prediction, ...]


@dataclass(frozen=True)
class ScoreResult(Result):
    """One image's score; when `error` is set only `image_id` is meaningful.

    `bias_term` and `residual` are None when the analysed class has no fitted components;
    `fit_id` names the fit whose components and labels scored it ("" for none).
    """

    image_id: str
    error: ErrorStatus | None = None
    predictions: tuple[Prediction, ...] = ()
    class_index: int = -1
    logit: float = 0.0
    bias_term: float | None = None
    residual: float | None = None
    components: tuple[ComponentAlpha, ...] = ()
    spurious_alpha: float = 0.0
    trigger: bool = False
    spufix: SpufixResult | None = None
    fit_id: str = ""
    transfer_id: str = ""  # the transfer whose directions were applied ("" for none)

    @classmethod
    def failed(cls, image_id: str, code: str, message: str) -> ScoreResult:
        """The result of an image that could not be scored."""
        return cls(image_id, ErrorStatus(code, message))


# ---- evaluate ----



@dataclass(frozen=True)
class EvaluateProgress(Result):
    phase: str  # "queued", "scanning", "clean", "spurious"
    images_done: int
    images_total: int
    elapsed_s: float


@dataclass(frozen=True)
class ClassScore(Result):
    class_index: int
    auc: float
    ap: float
    clean_mean_prob: float
    spurious_mean_prob: float
    clean_frac_predicted: float
    spurious_frac_predicted: float


@dataclass(frozen=True)
class ScoreTable(Result):
    mean_auc: float
    mean_ap: float
    classes: tuple[ClassScore, ...]
    clean_accuracy: float
    spurious_frac_predicted: float


@dataclass(frozen=True)
class SpuriousDirection(Result):
    """A direction an evaluation's SpuFix removed: an own component, or a transferred one (`source`)."""

    class_index: int
    component: int
    source: str = ""


@dataclass(frozen=True)
class EvaluateResult(Result):
    """The spurious score table without (`baseline`) and with SpuFix (`spufix`, in `spufix_mode`)."""

    model: str
    fit_id: str
    baseline: ScoreTable
    spufix: ScoreTable | None
    spufix_mode: SpufixModeName | None
    clean_images: int
    spurious_images: int
    skipped_images: int = 0  # unreadable files, left out of both sets
    evaluation_id: str = ""  # the server's kept copy (its store's evaluations/<id>.json); "" if none
    directions: SpuriousDirectionsName | None = None  # which directions SpuFix removed
    transfer_id: str = ""  # the transfer it applied ("" for none)
    spurious_directions: tuple[SpuriousDirection, ...] = ()


EvaluateUpdate = Union[EvaluateProgress, EvaluateResult]
