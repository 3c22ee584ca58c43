import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComponentLabel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNLABELED: _ClassVar[ComponentLabel]
    SPURIOUS: _ClassVar[ComponentLabel]
    NOT_SPURIOUS: _ClassVar[ComponentLabel]
    INCONSISTENT: _ClassVar[ComponentLabel]

class SpufixMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPUFIX_MODE_DEFAULT: _ClassVar[SpufixMode]
    PAPER: _ClassVar[SpufixMode]
    FLOOR: _ClassVar[SpufixMode]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]

class HeatmapMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEATMAP_DEFAULT: _ClassVar[HeatmapMethod]
    GRAD_CAM: _ClassVar[HeatmapMethod]
    INPUT_GRADIENT: _ClassVar[HeatmapMethod]
    HEATMAP_NONE: _ClassVar[HeatmapMethod]
    INTEGRATED_GRADIENTS: _ClassVar[HeatmapMethod]

class AttackParameterization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTACK_PARAMETERIZATION_DEFAULT: _ClassVar[AttackParameterization]
    PIXEL: _ClassVar[AttackParameterization]
    LOW_FREQUENCY: _ClassVar[AttackParameterization]
    JITTER: _ClassVar[AttackParameterization]

class SpuriousDirections(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTIONS_DEFAULT: _ClassVar[SpuriousDirections]
    OWN: _ClassVar[SpuriousDirections]
    TRANSFERRED: _ClassVar[SpuriousDirections]
    BOTH: _ClassVar[SpuriousDirections]
UNLABELED: ComponentLabel
SPURIOUS: ComponentLabel
NOT_SPURIOUS: ComponentLabel
INCONSISTENT: ComponentLabel
SPUFIX_MODE_DEFAULT: SpufixMode
PAPER: SpufixMode
FLOOR: SpufixMode
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
HEATMAP_DEFAULT: HeatmapMethod
GRAD_CAM: HeatmapMethod
INPUT_GRADIENT: HeatmapMethod
HEATMAP_NONE: HeatmapMethod
INTEGRATED_GRADIENTS: HeatmapMethod
ATTACK_PARAMETERIZATION_DEFAULT: AttackParameterization
PIXEL: AttackParameterization
LOW_FREQUENCY: AttackParameterization
JITTER: AttackParameterization
DIRECTIONS_DEFAULT: SpuriousDirections
OWN: SpuriousDirections
TRANSFERRED: SpuriousDirections
BOTH: SpuriousDirections

class ErrorStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("data", "height", "width", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("id", "encoded", "raw")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    id: str
    encoded: bytes
    raw: RawImage
    def __init__(self, id: _Optional[str] = ..., encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class PngImage(_message.Message):
    __slots__ = ("data", "width", "height")
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    width: int
    height: int
    def __init__(self, data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ClassInfo(_message.Message):
    __slots__ = ("index", "name", "wnid")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WNID_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    wnid: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., wnid: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "backend", "device", "num_classes", "feature_dim", "input_size", "digest", "ready", "supports_gradients", "fit_id", "fitted_classes", "max_batch_size", "classes", "runtime", "transfer", "fit_classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    FITTED_CLASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    FIT_CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: str
    device: str
    num_classes: int
    feature_dim: int
    input_size: int
    digest: str
    ready: bool
    supports_gradients: bool
    fit_id: str
    fitted_classes: _containers.RepeatedScalarFieldContainer[int]
    max_batch_size: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassInfo]
    runtime: str
    transfer: TransferInfo
    fit_classes: _containers.RepeatedCompositeFieldContainer[FitClass]
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., num_classes: _Optional[int] = ..., feature_dim: _Optional[int] = ..., input_size: _Optional[int] = ..., digest: _Optional[str] = ..., ready: _Optional[bool] = ..., supports_gradients: _Optional[bool] = ..., fit_id: _Optional[str] = ..., fitted_classes: _Optional[_Iterable[int]] = ..., max_batch_size: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassInfo, _Mapping]]] = ..., runtime: _Optional[str] = ..., transfer: _Optional[_Union[TransferInfo, _Mapping]] = ..., fit_classes: _Optional[_Iterable[_Union[FitClass, _Mapping]]] = ...) -> None: ...

class TransferInfo(_message.Message):
    __slots__ = ("transfer_id", "source_model", "source_digest", "source_fit", "labels_snapshot", "labels", "classes", "created")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIT_FIELD_NUMBER: _ClassVar[int]
    LABELS_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    source_model: str
    source_digest: str
    source_fit: str
    labels_snapshot: str
    labels: _containers.RepeatedCompositeFieldContainer[LabelRecord]
    classes: _containers.RepeatedScalarFieldContainer[int]
    created: _timestamp_pb2.Timestamp
    def __init__(self, transfer_id: _Optional[str] = ..., source_model: _Optional[str] = ..., source_digest: _Optional[str] = ..., source_fit: _Optional[str] = ..., labels_snapshot: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[LabelRecord, _Mapping]]] = ..., classes: _Optional[_Iterable[int]] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FitRequest(_message.Message):
    __slots__ = ("model", "dataset", "classes", "num_components", "batch_size", "job_id", "extend")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    model: str
    dataset: str
    classes: _containers.RepeatedScalarFieldContainer[int]
    num_components: int
    batch_size: int
    job_id: str
    extend: bool
    def __init__(self, model: _Optional[str] = ..., dataset: _Optional[str] = ..., classes: _Optional[_Iterable[int]] = ..., num_components: _Optional[int] = ..., batch_size: _Optional[int] = ..., job_id: _Optional[str] = ..., extend: _Optional[bool] = ...) -> None: ...

class FitUpdate(_message.Message):
    __slots__ = ("job_id", "progress", "summary", "transfer")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    progress: FitProgress
    summary: FitSummary
    transfer: TransferSummary
    def __init__(self, job_id: _Optional[str] = ..., progress: _Optional[_Union[FitProgress, _Mapping]] = ..., summary: _Optional[_Union[FitSummary, _Mapping]] = ..., transfer: _Optional[_Union[TransferSummary, _Mapping]] = ...) -> None: ...

class FitProgress(_message.Message):
    __slots__ = ("phase", "images_done", "images_total", "classes_done", "classes_total", "elapsed_s")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_DONE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    phase: str
    images_done: int
    images_total: int
    classes_done: int
    classes_total: int
    elapsed_s: float
    def __init__(self, phase: _Optional[str] = ..., images_done: _Optional[int] = ..., images_total: _Optional[int] = ..., classes_done: _Optional[int] = ..., classes_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class FitClass(_message.Message):
    __slots__ = ("class_index", "images", "num_components")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    images: int
    num_components: int
    def __init__(self, class_index: _Optional[int] = ..., images: _Optional[int] = ..., num_components: _Optional[int] = ...) -> None: ...

class FitSummary(_message.Message):
    __slots__ = ("fit_id", "model", "digest", "images", "skipped_images", "classes", "elapsed_s", "labels_from_fit", "labels_carried", "labels_not_carried")
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    LABELS_FROM_FIT_FIELD_NUMBER: _ClassVar[int]
    LABELS_CARRIED_FIELD_NUMBER: _ClassVar[int]
    LABELS_NOT_CARRIED_FIELD_NUMBER: _ClassVar[int]
    fit_id: str
    model: str
    digest: str
    images: int
    skipped_images: int
    classes: _containers.RepeatedCompositeFieldContainer[FitClass]
    elapsed_s: float
    labels_from_fit: str
    labels_carried: _containers.RepeatedCompositeFieldContainer[LabelCarried]
    labels_not_carried: _containers.RepeatedCompositeFieldContainer[LabelNotCarried]
    def __init__(self, fit_id: _Optional[str] = ..., model: _Optional[str] = ..., digest: _Optional[str] = ..., images: _Optional[int] = ..., skipped_images: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[FitClass, _Mapping]]] = ..., elapsed_s: _Optional[float] = ..., labels_from_fit: _Optional[str] = ..., labels_carried: _Optional[_Iterable[_Union[LabelCarried, _Mapping]]] = ..., labels_not_carried: _Optional[_Iterable[_Union[LabelNotCarried, _Mapping]]] = ...) -> None: ...

class LabelCarried(_message.Message):
    __slots__ = ("class_index", "from_component", "to_component", "label", "cos")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    FROM_COMPONENT_FIELD_NUMBER: _ClassVar[int]
    TO_COMPONENT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    COS_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    from_component: int
    to_component: int
    label: ComponentLabel
    cos: float
    def __init__(self, class_index: _Optional[int] = ..., from_component: _Optional[int] = ..., to_component: _Optional[int] = ..., label: _Optional[_Union[ComponentLabel, str]] = ..., cos: _Optional[float] = ...) -> None: ...

class LabelNotCarried(_message.Message):
    __slots__ = ("class_index", "component", "label", "best_cos", "reason")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    BEST_COS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    component: int
    label: ComponentLabel
    best_cos: float
    reason: str
    def __init__(self, class_index: _Optional[int] = ..., component: _Optional[int] = ..., label: _Optional[_Union[ComponentLabel, str]] = ..., best_cos: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "model", "state", "request", "progress", "summary", "error", "created", "updated", "kind", "transfer", "transfer_summary")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: str
    state: JobState
    request: FitRequest
    progress: FitProgress
    summary: FitSummary
    error: ErrorStatus
    created: _timestamp_pb2.Timestamp
    updated: _timestamp_pb2.Timestamp
    kind: str
    transfer: TransferRequest
    transfer_summary: TransferSummary
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., request: _Optional[_Union[FitRequest, _Mapping]] = ..., progress: _Optional[_Union[FitProgress, _Mapping]] = ..., summary: _Optional[_Union[FitSummary, _Mapping]] = ..., error: _Optional[_Union[ErrorStatus, _Mapping]] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[str] = ..., transfer: _Optional[_Union[TransferRequest, _Mapping]] = ..., transfer_summary: _Optional[_Union[TransferSummary, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetComponentsRequest(_message.Message):
    __slots__ = ("model", "class_index", "top", "include_vectors", "fit_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    class_index: int
    top: int
    include_vectors: bool
    fit_id: str
    def __init__(self, model: _Optional[str] = ..., class_index: _Optional[int] = ..., top: _Optional[int] = ..., include_vectors: _Optional[bool] = ..., fit_id: _Optional[str] = ...) -> None: ...

class Component(_message.Message):
    __slots__ = ("index", "eigenvalue", "explained_variance", "alpha_mean", "alpha_floor", "alpha_max", "label", "note")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EIGENVALUE_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_MEAN_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FLOOR_FIELD_NUMBER: _ClassVar[int]
    ALPHA_MAX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    index: int
    eigenvalue: float
    explained_variance: float
    alpha_mean: float
    alpha_floor: float
    alpha_max: float
    label: ComponentLabel
    note: str
    def __init__(self, index: _Optional[int] = ..., eigenvalue: _Optional[float] = ..., explained_variance: _Optional[float] = ..., alpha_mean: _Optional[float] = ..., alpha_floor: _Optional[float] = ..., alpha_max: _Optional[float] = ..., label: _Optional[_Union[ComponentLabel, str]] = ..., note: _Optional[str] = ...) -> None: ...

class GetComponentsResponse(_message.Message):
    __slots__ = ("model", "class_index", "fit_id", "images", "num_components", "floor_percentile", "bias_term", "components", "vectors", "mean")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    FLOOR_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    BIAS_TERM_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    model: str
    class_index: int
    fit_id: str
    images: int
    num_components: int
    floor_percentile: float
    bias_term: float
    components: _containers.RepeatedCompositeFieldContainer[Component]
    vectors: Tensor
    mean: Tensor
    def __init__(self, model: _Optional[str] = ..., class_index: _Optional[int] = ..., fit_id: _Optional[str] = ..., images: _Optional[int] = ..., num_components: _Optional[int] = ..., floor_percentile: _Optional[float] = ..., bias_term: _Optional[float] = ..., components: _Optional[_Iterable[_Union[Component, _Mapping]]] = ..., vectors: _Optional[_Union[Tensor, _Mapping]] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LabelRequest(_message.Message):
    __slots__ = ("model", "class_index", "component", "label", "note", "fit_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    class_index: int
    component: int
    label: ComponentLabel
    note: str
    fit_id: str
    def __init__(self, model: _Optional[str] = ..., class_index: _Optional[int] = ..., component: _Optional[int] = ..., label: _Optional[_Union[ComponentLabel, str]] = ..., note: _Optional[str] = ..., fit_id: _Optional[str] = ...) -> None: ...

class LabelRecord(_message.Message):
    __slots__ = ("model", "fit_id", "class_index", "component", "label", "note", "updated", "author")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    model: str
    fit_id: str
    class_index: int
    component: int
    label: ComponentLabel
    note: str
    updated: _timestamp_pb2.Timestamp
    author: str
    def __init__(self, model: _Optional[str] = ..., fit_id: _Optional[str] = ..., class_index: _Optional[int] = ..., component: _Optional[int] = ..., label: _Optional[_Union[ComponentLabel, str]] = ..., note: _Optional[str] = ..., updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., author: _Optional[str] = ...) -> None: ...

class ListLabelsRequest(_message.Message):
    __slots__ = ("model", "class_index", "label", "fit_id", "component", "history")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    class_index: int
    label: ComponentLabel
    fit_id: str
    component: int
    history: bool
    def __init__(self, model: _Optional[str] = ..., class_index: _Optional[int] = ..., label: _Optional[_Union[ComponentLabel, str]] = ..., fit_id: _Optional[str] = ..., component: _Optional[int] = ..., history: _Optional[bool] = ...) -> None: ...

class ListLabelsResponse(_message.Message):
    __slots__ = ("fit_id", "labels", "history")
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    fit_id: str
    labels: _containers.RepeatedCompositeFieldContainer[LabelRecord]
    history: _containers.RepeatedCompositeFieldContainer[LabelRecord]
    def __init__(self, fit_id: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[LabelRecord, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[LabelRecord, _Mapping]]] = ...) -> None: ...

class VisualizeRequest(_message.Message):
    __slots__ = ("model", "class_index", "components", "steps", "eps", "frame_every", "top_k", "seed", "heatmap", "fit_id", "heatmap_layer", "parameterization")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    FRAME_EVERY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_LAYER_FIELD_NUMBER: _ClassVar[int]
    PARAMETERIZATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    class_index: int
    components: _containers.RepeatedScalarFieldContainer[int]
    steps: int
    eps: float
    frame_every: int
    top_k: int
    seed: int
    heatmap: HeatmapMethod
    fit_id: str
    heatmap_layer: str
    parameterization: AttackParameterization
    def __init__(self, model: _Optional[str] = ..., class_index: _Optional[int] = ..., components: _Optional[_Iterable[int]] = ..., steps: _Optional[int] = ..., eps: _Optional[float] = ..., frame_every: _Optional[int] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., heatmap: _Optional[_Union[HeatmapMethod, str]] = ..., fit_id: _Optional[str] = ..., heatmap_layer: _Optional[str] = ..., parameterization: _Optional[_Union[AttackParameterization, str]] = ...) -> None: ...

class VisualizeUpdate(_message.Message):
    __slots__ = ("component", "top_image", "heatmap", "frame", "result")
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    TOP_IMAGE_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    component: int
    top_image: TopImage
    heatmap: Heatmap
    frame: AttackFrame
    result: AttackResult
    def __init__(self, component: _Optional[int] = ..., top_image: _Optional[_Union[TopImage, _Mapping]] = ..., heatmap: _Optional[_Union[Heatmap, _Mapping]] = ..., frame: _Optional[_Union[AttackFrame, _Mapping]] = ..., result: _Optional[_Union[AttackResult, _Mapping]] = ...) -> None: ...

class TopImage(_message.Message):
    __slots__ = ("rank", "image_id", "alpha", "png", "path")
    RANK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    rank: int
    image_id: str
    alpha: float
    png: PngImage
    path: str
    def __init__(self, rank: _Optional[int] = ..., image_id: _Optional[str] = ..., alpha: _Optional[float] = ..., png: _Optional[_Union[PngImage, _Mapping]] = ..., path: _Optional[str] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("rank", "image_id", "alpha", "method", "png", "path")
    RANK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    rank: int
    image_id: str
    alpha: float
    method: HeatmapMethod
    png: PngImage
    path: str
    def __init__(self, rank: _Optional[int] = ..., image_id: _Optional[str] = ..., alpha: _Optional[float] = ..., method: _Optional[_Union[HeatmapMethod, str]] = ..., png: _Optional[_Union[PngImage, _Mapping]] = ..., path: _Optional[str] = ...) -> None: ...

class AttackFrame(_message.Message):
    __slots__ = ("step", "alpha", "prob", "png")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    step: int
    alpha: float
    prob: float
    png: PngImage
    def __init__(self, step: _Optional[int] = ..., alpha: _Optional[float] = ..., prob: _Optional[float] = ..., png: _Optional[_Union[PngImage, _Mapping]] = ...) -> None: ...

class AttackResult(_message.Message):
    __slots__ = ("start_alpha", "final_alpha", "final_prob", "steps", "png", "eps", "parameterization")
    START_ALPHA_FIELD_NUMBER: _ClassVar[int]
    FINAL_ALPHA_FIELD_NUMBER: _ClassVar[int]
    FINAL_PROB_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERIZATION_FIELD_NUMBER: _ClassVar[int]
    start_alpha: float
    final_alpha: float
    final_prob: float
    steps: int
    png: PngImage
    eps: float
    parameterization: AttackParameterization
    def __init__(self, start_alpha: _Optional[float] = ..., final_alpha: _Optional[float] = ..., final_prob: _Optional[float] = ..., steps: _Optional[int] = ..., png: _Optional[_Union[PngImage, _Mapping]] = ..., eps: _Optional[float] = ..., parameterization: _Optional[_Union[AttackParameterization, str]] = ...) -> None: ...

class ScoreOptions(_message.Message):
    __slots__ = ("class_index", "top", "spufix")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    SPUFIX_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    top: int
    spufix: SpufixMode
    def __init__(self, class_index: _Optional[int] = ..., top: _Optional[int] = ..., spufix: _Optional[_Union[SpufixMode, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "images", "options")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    options: ScoreOptions
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("class_index", "name", "prob", "logit")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    name: str
    prob: float
    logit: float
    def __init__(self, class_index: _Optional[int] = ..., name: _Optional[str] = ..., prob: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class ComponentAlpha(_message.Message):
    __slots__ = ("index", "alpha", "label", "source")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    alpha: float
    label: ComponentLabel
    source: str
    def __init__(self, index: _Optional[int] = ..., alpha: _Optional[float] = ..., label: _Optional[_Union[ComponentLabel, str]] = ..., source: _Optional[str] = ...) -> None: ...

class SpufixResult(_message.Message):
    __slots__ = ("mode", "logit", "predictions")
    MODE_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    mode: SpufixMode
    logit: float
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, mode: _Optional[_Union[SpufixMode, str]] = ..., logit: _Optional[float] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("image_id", "error", "predictions", "class_index", "logit", "bias_term", "residual", "components", "spurious_alpha", "trigger", "spufix", "fit_id", "transfer_id")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    BIAS_TERM_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    SPURIOUS_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    SPUFIX_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    error: ErrorStatus
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    class_index: int
    logit: float
    bias_term: float
    residual: float
    components: _containers.RepeatedCompositeFieldContainer[ComponentAlpha]
    spurious_alpha: float
    trigger: bool
    spufix: SpufixResult
    fit_id: str
    transfer_id: str
    def __init__(self, image_id: _Optional[str] = ..., error: _Optional[_Union[ErrorStatus, _Mapping]] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., class_index: _Optional[int] = ..., logit: _Optional[float] = ..., bias_term: _Optional[float] = ..., residual: _Optional[float] = ..., components: _Optional[_Iterable[_Union[ComponentAlpha, _Mapping]]] = ..., spurious_alpha: _Optional[float] = ..., trigger: _Optional[bool] = ..., spufix: _Optional[_Union[SpufixResult, _Mapping]] = ..., fit_id: _Optional[str] = ..., transfer_id: _Optional[str] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("request_id", "model", "image", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    image: Image
    options: ScoreOptions
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., options: _Optional[_Union[ScoreOptions, _Mapping]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "result")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    result: ScoreResult
    def __init__(self, request_id: _Optional[str] = ..., result: _Optional[_Union[ScoreResult, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("model", "clean", "spurious", "spufix", "classes", "batch_size", "directions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLEAN_FIELD_NUMBER: _ClassVar[int]
    SPURIOUS_FIELD_NUMBER: _ClassVar[int]
    SPUFIX_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    clean: str
    spurious: str
    spufix: SpufixMode
    classes: _containers.RepeatedScalarFieldContainer[int]
    batch_size: int
    directions: SpuriousDirections
    def __init__(self, model: _Optional[str] = ..., clean: _Optional[str] = ..., spurious: _Optional[str] = ..., spufix: _Optional[_Union[SpufixMode, str]] = ..., classes: _Optional[_Iterable[int]] = ..., batch_size: _Optional[int] = ..., directions: _Optional[_Union[SpuriousDirections, str]] = ...) -> None: ...

class SpuriousDirection(_message.Message):
    __slots__ = ("class_index", "component", "source")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    component: int
    source: str
    def __init__(self, class_index: _Optional[int] = ..., component: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class EvaluateUpdate(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: EvaluateProgress
    result: EvaluateResult
    def __init__(self, progress: _Optional[_Union[EvaluateProgress, _Mapping]] = ..., result: _Optional[_Union[EvaluateResult, _Mapping]] = ...) -> None: ...

class EvaluateProgress(_message.Message):
    __slots__ = ("phase", "images_done", "images_total", "elapsed_s")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    IMAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    phase: str
    images_done: int
    images_total: int
    elapsed_s: float
    def __init__(self, phase: _Optional[str] = ..., images_done: _Optional[int] = ..., images_total: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("class_index", "auc", "ap", "clean_mean_prob", "spurious_mean_prob", "clean_frac_predicted", "spurious_frac_predicted")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    AUC_FIELD_NUMBER: _ClassVar[int]
    AP_FIELD_NUMBER: _ClassVar[int]
    CLEAN_MEAN_PROB_FIELD_NUMBER: _ClassVar[int]
    SPURIOUS_MEAN_PROB_FIELD_NUMBER: _ClassVar[int]
    CLEAN_FRAC_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    SPURIOUS_FRAC_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    auc: float
    ap: float
    clean_mean_prob: float
    spurious_mean_prob: float
    clean_frac_predicted: float
    spurious_frac_predicted: float
    def __init__(self, class_index: _Optional[int] = ..., auc: _Optional[float] = ..., ap: _Optional[float] = ..., clean_mean_prob: _Optional[float] = ..., spurious_mean_prob: _Optional[float] = ..., clean_frac_predicted: _Optional[float] = ..., spurious_frac_predicted: _Optional[float] = ...) -> None: ...

class ScoreTable(_message.Message):
    __slots__ = ("mean_auc", "mean_ap", "classes", "clean_accuracy", "spurious_frac_predicted")
    MEAN_AUC_FIELD_NUMBER: _ClassVar[int]
    MEAN_AP_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SPURIOUS_FRAC_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    mean_auc: float
    mean_ap: float
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    clean_accuracy: float
    spurious_frac_predicted: float
    def __init__(self, mean_auc: _Optional[float] = ..., mean_ap: _Optional[float] = ..., classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., clean_accuracy: _Optional[float] = ..., spurious_frac_predicted: _Optional[float] = ...) -> None: ...

class EvaluateResult(_message.Message):
    __slots__ = ("model", "fit_id", "baseline", "spufix", "spufix_mode", "clean_images", "spurious_images", "skipped_images", "evaluation_id", "directions", "transfer_id", "spurious_directions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FIT_ID_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    SPUFIX_FIELD_NUMBER: _ClassVar[int]
    SPUFIX_MODE_FIELD_NUMBER: _ClassVar[int]
    CLEAN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SPURIOUS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SPURIOUS_DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    fit_id: str
    baseline: ScoreTable
    spufix: ScoreTable
    spufix_mode: SpufixMode
    clean_images: int
    spurious_images: int
    skipped_images: int
    evaluation_id: str
    directions: SpuriousDirections
    transfer_id: str
    spurious_directions: _containers.RepeatedCompositeFieldContainer[SpuriousDirection]
    def __init__(self, model: _Optional[str] = ..., fit_id: _Optional[str] = ..., baseline: _Optional[_Union[ScoreTable, _Mapping]] = ..., spufix: _Optional[_Union[ScoreTable, _Mapping]] = ..., spufix_mode: _Optional[_Union[SpufixMode, str]] = ..., clean_images: _Optional[int] = ..., spurious_images: _Optional[int] = ..., skipped_images: _Optional[int] = ..., evaluation_id: _Optional[str] = ..., directions: _Optional[_Union[SpuriousDirections, str]] = ..., transfer_id: _Optional[str] = ..., spurious_directions: _Optional[_Iterable[_Union[SpuriousDirection, _Mapping]]] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("source_model", "target_model", "classes", "batch_size", "job_id")
    SOURCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    source_model: str
    target_model: str
    classes: _containers.RepeatedScalarFieldContainer[int]
    batch_size: int
    job_id: str
    def __init__(self, source_model: _Optional[str] = ..., target_model: _Optional[str] = ..., classes: _Optional[_Iterable[int]] = ..., batch_size: _Optional[int] = ..., job_id: _Optional[str] = ...) -> None: ...

class TransferUpdate(_message.Message):
    __slots__ = ("job_id", "progress", "summary")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    progress: FitProgress
    summary: TransferSummary
    def __init__(self, job_id: _Optional[str] = ..., progress: _Optional[_Union[FitProgress, _Mapping]] = ..., summary: _Optional[_Union[TransferSummary, _Mapping]] = ...) -> None: ...

class TransferDirection(_message.Message):
    __slots__ = ("source_component", "covariance", "alpha_floor")
    SOURCE_COMPONENT_FIELD_NUMBER: _ClassVar[int]
    COVARIANCE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FLOOR_FIELD_NUMBER: _ClassVar[int]
    source_component: int
    covariance: float
    alpha_floor: float
    def __init__(self, source_component: _Optional[int] = ..., covariance: _Optional[float] = ..., alpha_floor: _Optional[float] = ...) -> None: ...

class TransferClass(_message.Message):
    __slots__ = ("class_index", "images", "directions")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    images: int
    directions: _containers.RepeatedCompositeFieldContainer[TransferDirection]
    def __init__(self, class_index: _Optional[int] = ..., images: _Optional[int] = ..., directions: _Optional[_Iterable[_Union[TransferDirection, _Mapping]]] = ...) -> None: ...

class TransferSummary(_message.Message):
    __slots__ = ("transfer_id", "source_model", "source_fit", "target_model", "target_digest", "labels_snapshot", "classes", "images", "skipped_images", "elapsed_s")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LABELS_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    source_model: str
    source_fit: str
    target_model: str
    target_digest: str
    labels_snapshot: str
    classes: _containers.RepeatedCompositeFieldContainer[TransferClass]
    images: int
    skipped_images: int
    elapsed_s: float
    def __init__(self, transfer_id: _Optional[str] = ..., source_model: _Optional[str] = ..., source_fit: _Optional[str] = ..., target_model: _Optional[str] = ..., target_digest: _Optional[str] = ..., labels_snapshot: _Optional[str] = ..., classes: _Optional[_Iterable[_Union[TransferClass, _Mapping]]] = ..., images: _Optional[int] = ..., skipped_images: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...
