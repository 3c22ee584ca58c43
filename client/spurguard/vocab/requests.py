"""What a spurguard call asks for, as frozen dataclasses both sides share (see results.py for
the naming rules). None means "the server's default"; the server checks the values once, when
a request enters its serving layer (spurguard.server.serving.options).
"""
from __future__ import annotations

from dataclasses import dataclass

from spurguard.vocab.names import (
    AttackParameterizationName,
    HeatmapMethodName,
    LabelName,
    SpufixModeName,
    SpuriousDirectionsName,
)


@dataclass(frozen=True)
class FitRequest:
    """What a fit job is started with (and echoed in `Job.request`)."""

    model: str
    dataset: str
    classes: tuple[int, ...] = ()
    num_components: int | None = None
    batch_size: int | None = None
    job_id: str | None = None
    extend: bool = False


@dataclass(frozen=True)
class GetComponentsRequest:
    model: str
    class_index: int
    top: int | None = None  # the first N components by index; None or 0: all kept
    include_vectors: bool = False
    fit_id: str | None = None  # None: the current fit


@dataclass(frozen=True)
class LabelRequest:
    model: str
    class_index: int
    component: int
    label: LabelName
    note: str = ""
    fit_id: str | None = None


@dataclass(frozen=True)
class ListLabelsRequest:
    model: str
    class_index: int | None = None
    label: LabelName | None = None  # "unlabeled": the components nobody labelled yet
    fit_id: str | None = None
    component: int | None = None  # only this component (needs class_index)
    history: bool = False  # also every write of the selected components, oldest first


@dataclass(frozen=True)
class VisualizeRequest:
    """What to visualise and how hard to attack; None: the server's default."""

    model: str
    class_index: int
    components: tuple[int, ...]
    steps: int | None = None
    eps: float | None = None
    frame_every: int | None = None
    top_k: int | None = None
    seed: int | None = None
    heatmap: HeatmapMethodName | None = None
    fit_id: str | None = None
    heatmap_layer: str | None = None
    parameterization: AttackParameterizationName | None = None


@dataclass(frozen=True)
class ScoreOptions:
    """How to analyse each image; None: each image's top-1 class / the default top / the server's mode."""

    class_index: int | None = None
    top: int | None = None  # 0: every kept component
    spufix: SpufixModeName | None = None


@dataclass(frozen=True)
class EvaluateRequest:
    """The spurious score benchmark on server-side folders; None: the server's default."""

    model: str
    clean: str
    spurious: str
    spufix: SpufixModeName | None = None
    classes: tuple[int, ...] = ()
    batch_size: int | None = None
    directions: SpuriousDirectionsName | None = None  # None: "both", what Score applies


@dataclass(frozen=True)
class TransferRequest:
    """Carry the source model's spurious labels (its current fit) to the target (SPEC §1 transfer)."""

    source_model: str
    target_model: str
    classes: tuple[int, ...] = ()  # empty: every class with spurious labels
    batch_size: int | None = None
    job_id: str | None = None

    @property
    def model(self) -> str:
        """The model the job belongs to (its jobs list and store): the target."""
        return self.target_model
