"""inference.GRPCInferenceService (KServe v2, the Open Inference Protocol) on spurguard's port.

Why: Triton and KServe clients (`tritonclient.grpc`, KServe's InferenceGRPCClient) can then
call spurguard as they would any model server, without spurguard's own client. The service
definition is tritonclient's (`service_pb2`), not a copy. Like the Spurguard servicer, this one
only converts: tensors in, the data plane's `infer` (Score's batcher and Guard), arrays out.

A model takes one input, IMAGE: BYTES [N] or [N, 1] (each element an encoded image file) or
UINT8 [N, H, W, 3] (RGB pixels), and the request parameters `class_index` (int: the class to
analyse; default each image's top-1) and `spufix` ("paper" or "floor"; default the server's).
It answers the OUTPUTS below (those the request names, all when it names none) as
`raw_output_contents`, which is what tritonclient's `InferResult.as_numpy` reads.
"""
from __future__ import annotations

import importlib.metadata
import math
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import TRITON_RESERVED_REQUEST_PARAMS, TRITON_RESERVED_REQUEST_PARAMS_PREFIX

from spurguard import vocab
from spurguard.server.errors import InvalidInput, NotFound
from spurguard.server.rpc.handlers import unary_call
from spurguard.server.serving.dataplane import DataPlane
from spurguard.server.serving.guard import Inference
from spurguard.server.serving.metrics import Metrics
from spurguard.server.serving.models import ImageSource, ServedModel
from spurguard.vocab import SPUFIX_MODES

SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name
PLATFORM = "spurguard"  # ModelMetadata's platform, ModelConfig's platform and backend
VERSION = "1"  # every model has one version: its current (fit, labels) move under it, as Score's do
INPUT = "IMAGE"


@dataclass(frozen=True)
class Output:
    """One output tensor: its OIP name and datatype, its config type, and where it comes from."""

    name: str
    datatype: str
    config_type: int  # model_config_pb2.DataType
    per_class: bool  # [N, C]; else [N]
    field: str  # the Inference attribute it is


OUTPUTS = (
    Output("LOGITS", "FP32", mc.TYPE_FP32, True, "logits"),
    Output("PREDICTION", "INT32", mc.TYPE_INT32, False, "prediction"),
    Output("SPURIOUS_ALPHA", "FP32", mc.TYPE_FP32, False, "spurious_alpha"),
    Output("TRIGGER", "BOOL", mc.TYPE_BOOL, False, "trigger"),
    Output("SPUFIX_LOGITS", "FP32", mc.TYPE_FP32, True, "spufix_logits"),
)
_OUTPUT_BY_NAME = {output.name: output for output in OUTPUTS}
_PARAMETERS_HELP = "class_index (an integer) and spufix ('paper' or 'floor')"


def _server_version() -> str:
    try:
        return importlib.metadata.version("spurguard")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- tensors in ----


def _split_bytes(raw: bytes) -> list[memoryview]:
    """A raw BYTES tensor's elements: each a 4-byte little-endian length, then that many bytes."""
    view, elements, offset = memoryview(raw), [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"{INPUT}'s raw contents end inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidInput(f"{INPUT}'s raw contents end inside element {len(elements)} ({length} bytes declared)")
        elements.append(view[offset : offset + length])
        offset += length
    return elements


def read_images(request: oip.ModelInferRequest) -> list[ImageSource]:
    """The IMAGE input as backend inputs: encoded files (BYTES) or HxWx3 pixel arrays (UINT8),
    from `raw_input_contents` (what tritonclient sends) or from the tensor's typed contents."""
    if [tensor.name for tensor in request.inputs] != [INPUT]:
        raise InvalidInput(f"ModelInfer takes one input, {INPUT}; got {[tensor.name for tensor in request.inputs]}")
    tensor = request.inputs[0]
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"{INPUT} has shape {shape}; dimensions must be >= 0")
    if tensor.datatype == "BYTES":
        if len(shape) not in (1, 2) or shape[1:] not in ([], [1]):
            raise InvalidInput(f"BYTES {INPUT} has shape {shape}; use [N] or [N, 1], one encoded image file each")
        images: list[ImageSource] = list(_split_bytes(raw) if raw is not None else tensor.contents.bytes_contents)
        if len(images) != shape[0]:
            raise InvalidInput(f"BYTES {INPUT} has {len(images)} elements for shape {shape}")
        return images
    if tensor.datatype == "UINT8":
        if len(shape) != 4 or shape[3] != 3:
            raise InvalidInput(f"UINT8 {INPUT} has shape {shape}; use [N, H, W, 3], RGB pixels")
        if 0 in shape:  # also: numpy cannot even make an empty array of [0, 2**62, 2**62, 3]
            raise InvalidInput(f"UINT8 {INPUT} has shape {shape}, no pixels; every dimension must be >= 1")
        if raw is not None:
            pixels = np.frombuffer(raw, np.uint8)
        else:
            values = np.asarray(tensor.contents.uint_contents, np.uint32)
            if values.size and values.max() > 255:
                raise InvalidInput(f"UINT8 {INPUT} has values over 255")
            pixels = values.astype(np.uint8)
        if pixels.size != math.prod(shape):
            raise InvalidInput(f"UINT8 {INPUT} has {pixels.size} bytes; shape {shape} needs {math.prod(shape)}")
        return list(pixels.reshape(shape))
    raise InvalidInput(
        f"{INPUT} has datatype {tensor.datatype}; use BYTES (encoded image files) or UINT8 (pixels [N, H, W, 3])"
    )


def read_options(parameters: Mapping[str, oip.InferParameter]) -> vocab.ScoreOptions:
    """The request parameters as Score's options (checked further by serving.options); Triton's
    reserved ones (priority, timeout, ...) are accepted and have no effect here."""
    class_index: int | None = None
    spufix: vocab.SpufixModeName | None = None
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if key == "class_index":
            if kind not in ("int64_param", "uint64_param"):
                raise InvalidInput(f"parameter class_index must be an integer, got a {kind}")
            class_index = getattr(value, kind)
        elif key == "spufix":
            if kind != "string_param" or value.string_param not in SPUFIX_MODES:
                raise InvalidInput(f"parameter spufix must be 'paper' or 'floor', got {getattr(value, kind or 'string_param')!r}")
            spufix = value.string_param  # type: ignore[assignment]
        elif key not in TRITON_RESERVED_REQUEST_PARAMS and not key.startswith(TRITON_RESERVED_REQUEST_PARAMS_PREFIX):
            raise InvalidInput(f"unknown parameter {key!r}; spurguard takes {_PARAMETERS_HELP}")
    return vocab.ScoreOptions(class_index=class_index, spufix=spufix)


def read_outputs(requested: Sequence[oip.ModelInferRequest.InferRequestedOutputTensor]) -> tuple[Output, ...]:
    """The outputs asked for, in the request's order; all of them when none is named."""
    if not requested:
        return OUTPUTS
    for tensor in requested:
        if tensor.name not in _OUTPUT_BY_NAME:
            raise InvalidInput(f"unknown output {tensor.name!r}; outputs: {', '.join(_OUTPUT_BY_NAME)}")
        if tensor.parameters:
            raise InvalidInput(f"output {tensor.name} takes no parameters, got {sorted(tensor.parameters)}")
    return tuple(_OUTPUT_BY_NAME[tensor.name] for tensor in requested)


# ---- tensors out ----


def infer_response(request: oip.ModelInferRequest, outputs: Sequence[Output], arrays: Inference) -> oip.ModelInferResponse:
    """Outputs and their `raw_output_contents` in the same order (as_numpy pairs them by position)."""
    response = oip.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
    for output in outputs:
        array = np.ascontiguousarray(getattr(arrays, output.field))
        response.outputs.add(name=output.name, datatype=output.datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def model_metadata(served: ServedModel) -> oip.ModelMetadataResponse:
    """Tensor names, datatypes and shapes (-1: the batch); UNAVAILABLE while the model loads."""
    classes = served.backend.num_classes
    tensor = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=served.name,
        versions=[VERSION],
        platform=PLATFORM,
        inputs=[tensor(name=INPUT, datatype="BYTES", shape=[-1])],
        outputs=[
            tensor(name=o.name, datatype=o.datatype, shape=[-1, classes] if o.per_class else [-1]) for o in OUTPUTS
        ],
    )


def model_config(served: ServedModel, max_batch_size: int, spufix_default: str) -> mc.ModelConfig:
    """Triton's view of the model: dims without the batch, per-image scalars reshaped from [1]."""
    classes = served.backend.num_classes
    scalar = mc.ModelTensorReshape(shape=[])

    def dims(output: Output) -> dict[str, object]:
        return {"dims": [classes]} if output.per_class else {"dims": [1], "reshape": scalar}

    return mc.ModelConfig(
        name=served.name,
        platform=PLATFORM,
        backend=PLATFORM,
        max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=INPUT, data_type=mc.TYPE_STRING, dims=[1], reshape=scalar)],
        output=[mc.ModelOutput(name=o.name, data_type=o.config_type, **dims(o)) for o in OUTPUTS],
        parameters={
            "fit_id": mc.ModelParameter(string_value=served.guard.fit_id or ""),
            "spufix_default": mc.ModelParameter(string_value=spufix_default),
            "uint8_input": mc.ModelParameter(string_value=f"{INPUT} may also be UINT8 [N, H, W, 3] RGB pixels"),
            "request_parameters": mc.ModelParameter(string_value=_PARAMETERS_HELP),
        },
    )


# ---- the servicer ----


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Health, metadata and ModelInfer of every served model; the rest is UNIMPLEMENTED."""

    def __init__(self, plane: DataPlane, metrics: Metrics, draining: Callable[[], bool]) -> None:
        """`draining`: True once the server is shutting down (then nothing is ready)."""
        self.plane = plane
        self.metrics = metrics
        self._draining = draining

    def observe(self, rpc: str, request: object, code: grpc.StatusCode, started: float) -> None:
        """Request metrics; the model label only ever names a served model."""
        model = getattr(request, "name", None) or getattr(request, "model_name", "")
        label = model if isinstance(model, str) and model in self.plane.models else ""
        self.metrics.observe_request(rpc, label, code.name, time.monotonic() - started)

    def _model(self, name: str, version: str) -> ServedModel:
        """NOT_FOUND for an unknown model or a version other than VERSION ("" means it)."""
        served = self.plane.models.get(name)
        if version not in ("", VERSION):
            raise NotFound(f"model {name} has only version {VERSION}, not {version!r}")
        return served

    @unary_call
    async def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @unary_call
    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=not self._draining() and all(m.ready for m in self.plane.models))

    @unary_call
    async def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext) -> oip.ModelReadyResponse:
        served = self._model(request.name, request.version)
        return oip.ModelReadyResponse(ready=not self._draining() and served.serving)

    @unary_call
    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="spurguard", version=_server_version(), extensions=[])

    @unary_call
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        return model_metadata(self._model(request.name, request.version))

    @unary_call
    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        served = self._model(request.name, request.version)
        config = model_config(served, self.plane.max_request_images, self.plane.spufix_default)
        return oip.ModelConfigResponse(config=config)

    @unary_call
    async def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext) -> oip.ModelInferResponse:
        self._model(request.model_name, request.model_version)
        outputs = read_outputs(request.outputs)
        arrays = await self.plane.infer(request.model_name, read_images(request), read_options(request.parameters))
        return infer_response(request, outputs, arrays)


IMPLEMENTED = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer")


def _unimplemented(name: str) -> Callable[[InferenceServicer, object, grpc.aio.ServicerContext], Awaitable[None]]:
    """A handler that says which RPCs spurguard does serve (grpc's default says only "Method not implemented!")."""

    async def handler(self: InferenceServicer, request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{SERVICE_NAME}/{name} is not implemented by spurguard; it serves {', '.join(IMPLEMENTED)} "
            "(for a stream of images: spurguard.v1.Spurguard/ScoreStream)",
        )

    handler.__name__ = name
    return handler


for _method in SERVICE.methods:
    if _method.name not in IMPLEMENTED:
        setattr(InferenceServicer, _method.name, _unimplemented(_method.name))
