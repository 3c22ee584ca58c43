"""No request gets INTERNAL (issue 11): a property-based fuzzer over every RPC of spurguard.v1
and the Open Inference Protocol on one fitted server.

One in-process server (BackgroundServer, port 0) serves the shipped `demo` model, fitted on a
small planted dataset. Requests come from fuzz_support.messages (every field by its type, mixed
with the values this server knows) and are sent with raw stubs, so the fuzzer sends what the
typed client would refuse; images are mutated PNG / JPEG / WebP / GIF files. For each example:
the call ends within DEADLINE_S with a status that is not INTERNAL, UNKNOWN or
DEADLINE_EXCEEDED, no per-image or job error inside the replies is either, the server logged
no error (so no traceback either), and it still answers health.

Long calls: Visualize and Evaluate are cancelled by the fuzzer BUDGET_S after their first
reply (which must come within the deadline), WatchLabels (which never ends by itself) 50 ms
after it; each Fit job is cancelled through CancelJob once its first update names it, so fits
do not pile up.

Examples per RPC: SPURGUARD_FUZZ_EXAMPLES (default 150, `make fuzz` runs many more; the heavy
RPCs get a fifth). The run is derandomized (the same examples each time) unless
SPURGUARD_FUZZ_SEED picks another seed.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from spurguard.client import Client, FitSummary
from spurguard.server.demo import generate
from spurguard.server.rpc.app import BackgroundServer, ServerConfig
from spurguard.server.rpc.inference import OUTPUTS
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc

from fuzz_support import Realistic, base_images, messages, mutated

MODEL = "demo"
DEADLINE_S = 20.0  # a call still running after this is a hang
BUDGET_S = 1.0  # how long a Visualize / Evaluate stream is followed after its first reply
EXAMPLES = int(os.environ.get("SPURGUARD_FUZZ_EXAMPLES", "150"))
SEED = os.environ.get("SPURGUARD_FUZZ_SEED")
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
FORBIDDEN_NUMBERS = {code.value[0] for code in FORBIDDEN}  # as in ErrorStatus.code

pytestmark = [
    pytest.mark.timeout(120 + 20 * EXAMPLES),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]


class ErrorLog(logging.Handler):
    """Every ERROR record (an INTERNAL's traceback, grpc's or asyncio's unhandled errors) since
    the last clear, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass(frozen=True)
class Fuzzed:
    """The fitted server and what it knows, for realistic values."""

    server: BackgroundServer
    data: Path
    fit_id: str
    job_id: str
    images: list[bytes]
    errors: ErrorLog


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    data = generate(tmp / "data", 0, train_per_class=8, test_per_class=2, spurious_per_feature=2).root
    config = ServerConfig(models=(MODEL,), store=tmp / "store", port=0, device="cpu", data_roots=(data,), grace_s=1.0)
    errors = ErrorLog()
    logging.getLogger().addHandler(errors)
    try:
        with BackgroundServer(config) as server, Client(server.address, timeout=60) as client:
            summary = list(client.fit(MODEL, "train"))[-1]
            assert isinstance(summary, FitSummary)
            client.label(MODEL, 0, 0, "spurious", note="fuzz")
            pixels = np.asarray(Image.open(next((data / "train").rglob("*.png"))).convert("RGB"))
            yield Fuzzed(server, data, summary.fit_id, summary.job_id, base_images(pixels), errors)
    finally:
        logging.getLogger().removeHandler(errors)


# ---- what this server knows ----


def length_prefixed(files: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element its 4-byte little-endian length, then its bytes."""
    return b"".join(len(f).to_bytes(4, "little") + f for f in files)


@st.composite
def raw_images(draw: st.DrawFn) -> pb.RawImage:
    """Raw pixels whose data fits their shape, zero-sized and one-pixel ones too."""
    height, width = draw(st.integers(0, 70)), draw(st.integers(0, 70))
    channels = draw(st.sampled_from([1, 3, 4]))
    return pb.RawImage(data=draw(st.binary(min_size=height * width * channels, max_size=height * width * channels)),
                       height=height, width=width, channels=channels)


@st.composite
def infer_requests(
    draw: st.DrawFn, files: st.SearchStrategy[bytes], parameters: st.SearchStrategy[Any]
) -> oip.ModelInferRequest:
    """A ModelInfer request whose IMAGE tensor is consistent: BYTES [N] or [N, 1] of image files
    (raw contents or bytes_contents), or UINT8 [N, H, W, 3] pixels."""
    outputs = draw(st.lists(st.sampled_from([o.name for o in OUTPUTS]), max_size=3))
    request = oip.ModelInferRequest(model_name=MODEL, parameters=draw(parameters), outputs=[{"name": n} for n in outputs])
    if draw(st.booleans()):
        images = draw(st.lists(files, max_size=4))
        shape = [len(images)] + draw(st.sampled_from([[], [1]]))
        if draw(st.booleans()):
            request.inputs.add(name="IMAGE", datatype="BYTES", shape=shape)
            request.raw_input_contents.append(length_prefixed(images))
        else:
            request.inputs.add(name="IMAGE", datatype="BYTES", shape=shape, contents={"bytes_contents": images})
    else:  # pixels, mostly as many as the shape needs; a huge dimension (beside a 0, say) with a few bytes
        side = st.integers(0, 70) | st.sampled_from([2**31, 2**62])
        shape = [draw(st.integers(0, 3)), draw(side), draw(side), 3]
        size = math.prod(shape) if math.prod(shape) <= 3 * 70 * 70 * 3 else draw(st.integers(0, 64))
        request.inputs.add(name="IMAGE", datatype="UINT8", shape=shape)
        request.raw_input_contents.append(draw(st.binary(min_size=size, max_size=size)))
    return request


def realistic(f: Fuzzed) -> Realistic:
    """Field values this server knows (by "Message.field" or field name), so that requests reach
    the code behind the first checks."""
    classes = st.integers(-1, 6)  # the demo's classes are 0..5
    files = mutated(f.images)
    folders = st.sampled_from(["train", "clean_test", "spurious_test", str(f.data / "train"), "train/circle", "masks", ""])
    parameter_keys = st.sampled_from(["class_index", "spufix", "priority", "sequence_id", "x"])  # Triton reserves 2
    modes = st.sampled_from(["paper", "floor"])
    parameter = st.builds(oip.InferParameter, int64_param=classes) | st.builds(oip.InferParameter, string_param=modes)
    return {
        "model": st.just(MODEL), "model_name": st.just(MODEL),
        **{f"Model{what}Request.name": st.just(MODEL) for what in ("Ready", "Metadata", "Config")},
        "version": st.sampled_from(["", "1", "2"]), "model_version": st.sampled_from(["", "1"]),
        "class_index": classes, "classes": classes, "component": st.integers(0, 10), "components": st.integers(0, 10),
        "dataset": folders, "clean": folders, "spurious": folders,
        "fit_id": st.sampled_from([f.fit_id, ""]), "job_id": st.sampled_from([f.job_id, "fuzz-job", ""]),
        "num_components": st.integers(1, 12), "batch_size": st.integers(1, 64), "top": st.integers(0, 12),
        "steps": st.integers(1, 6), "frame_every": st.integers(0, 3), "top_k": st.integers(1, 4),
        "eps": st.floats(0.001, 60), "seed": st.integers(0, 3),
        "heatmap_layer": st.sampled_from(["0", "7", "13", "_guards_fn", "", "missing"]),
        "encoded": files, "RawImage": raw_images(), "Image.id": st.sampled_from(["a.png", ""]),
        "InferInputTensor.name": st.just("IMAGE"), "datatype": st.sampled_from(["BYTES", "UINT8", "FP32", ""]),
        "InferRequestedOutputTensor.name": st.sampled_from([o.name for o in OUTPUTS]),
        "shape": st.integers(0, 4), "bytes_contents": files,
        "raw_input_contents": st.lists(files, max_size=3).map(length_prefixed),
        "ParametersEntry.key": parameter_keys, "string_param": modes, "int64_param": classes,
        "ModelInferRequest": infer_requests(files, st.dictionaries(parameter_keys, parameter, max_size=3)),
    }


def bases(f: Fuzzed) -> dict[str, Message]:
    """A valid request per RPC, the starting point of most examples (fuzz_support.messages)."""
    image = pb.Image(id="base.png", encoded=f.images[0])
    job = f.job_id
    return {
        "GetModel": pb.GetModelRequest(model=MODEL), "ListJobs": pb.ListJobsRequest(model=MODEL),
        "GetJob": pb.GetJobRequest(job_id=job), "WatchJob": pb.WatchJobRequest(job_id=job),
        "CancelJob": pb.CancelJobRequest(job_id=job),
        "GetComponents": pb.GetComponentsRequest(model=MODEL, class_index=0, top=3, include_vectors=True),
        "Label": pb.LabelRequest(model=MODEL, class_index=1, component=1, label=pb.NOT_SPURIOUS, note="base"),
        "ListLabels": pb.ListLabelsRequest(model=MODEL, class_index=0),
        "WatchLabels": pb.ListLabelsRequest(model=MODEL, class_index=0, history=True),
        "Score": pb.ScoreRequest(model=MODEL, images=[image], options=pb.ScoreOptions(top=3)),
        "ScoreStream": pb.ScoreStreamRequest(request_id="1", model=MODEL, image=image, options=pb.ScoreOptions(top=0)),
        "Fit": pb.FitRequest(model=MODEL, dataset="train", classes=[0, 1], num_components=3),
        "Visualize": pb.VisualizeRequest(model=MODEL, class_index=0, components=[0], steps=2, frame_every=1, top_k=2,
                                         heatmap=pb.INPUT_GRADIENT),
        "Evaluate": pb.EvaluateRequest(model=MODEL, clean="clean_test", spurious="spurious_test", classes=[0]),
        "OIP.ModelInfer": oip.ModelInferRequest(
            model_name=MODEL, inputs=[{"name": "IMAGE", "datatype": "BYTES", "shape": [1]}],
            raw_input_contents=[length_prefixed([f.images[0]])],
        ),
        **{f"OIP.Model{what}": getattr(oip, f"Model{what}Request")(name=MODEL) for what in ("Ready", "Metadata", "Config")},
    }


# ---- calling ----


@dataclass(frozen=True)
class Stubs:
    spurguard: pb_grpc.SpurguardStub
    inference: oip_grpc.GRPCInferenceServiceStub


Send = Callable[[Stubs, Any], list[Message]]  # the replies; a failed call raises grpc.RpcError


def unary(name: str, service: str = "spurguard") -> Send:
    return lambda stubs, request: [getattr(getattr(stubs, service), name)(request, timeout=DEADLINE_S)]


def streamed(name: str) -> Send:
    return lambda stubs, request: list(getattr(stubs.spurguard, name)(request, timeout=DEADLINE_S))


def followed(name: str, budget_s: float = BUDGET_S) -> Send:
    """A long stream: its first reply within the deadline, then `budget_s` more, then cancelled."""

    def send(stubs: Stubs, request: Message) -> list[Message]:
        call = getattr(stubs.spurguard, name)(request, timeout=DEADLINE_S)
        replies: list[Message] = []
        timer = threading.Timer(budget_s, call.cancel)
        try:
            for reply in call:
                replies.append(reply)
                if len(replies) == 1:
                    timer.start()
        finally:
            timer.cancel()
        return replies

    return send


def fit(stubs: Stubs, request: pb.FitRequest) -> list[Message]:
    """A Fit followed to its end; a job still running BUDGET_S after its first update is
    cancelled through CancelJob (whose reply is checked too), so that jobs do not pile up."""
    replies: list[Message] = []

    def cancel(job_id: str) -> None:
        replies.append(stubs.spurguard.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=DEADLINE_S))

    timer: threading.Timer | None = None
    try:
        for update in stubs.spurguard.Fit(request, timeout=DEADLINE_S):
            if timer is None:
                timer = threading.Timer(BUDGET_S, cancel, (update.job_id,))
                timer.start()
            replies.append(update)
    finally:
        if timer is not None:
            timer.cancel()
    return replies


def score_stream(stubs: Stubs, requests: list[pb.ScoreStreamRequest]) -> list[Message]:
    return list(stubs.spurguard.ScoreStream(iter(requests), timeout=DEADLINE_S))


Requests = Callable[[Realistic, "Message | None"], st.SearchStrategy[Any]]  # (realistic values, base request)


@dataclass(frozen=True)
class Rpc:
    requests: Requests
    send: Send
    heavy: bool = False  # seconds per example: fewer of them


def _requests(message_class: type[Message]) -> Requests:
    return lambda known, base: messages(message_class, known, base)


RPCS: dict[str, Rpc] = {
    **{name: Rpc(_requests(getattr(pb, f"{name}Request")), unary(name))
       for name in ("ListModels", "GetModel", "GetJob", "ListJobs", "CancelJob", "GetComponents", "Label", "ListLabels", "Score")},
    "WatchJob": Rpc(_requests(pb.WatchJobRequest), streamed("WatchJob")),
    # never ends by itself: its first snapshot (or refusal) is what counts
    "WatchLabels": Rpc(_requests(pb.ListLabelsRequest), followed("WatchLabels", budget_s=0.05)),
    "ScoreStream": Rpc(lambda known, base: st.lists(messages(pb.ScoreStreamRequest, known, base), max_size=6),
                       score_stream),
    "Fit": Rpc(_requests(pb.FitRequest), fit),
    "Visualize": Rpc(_requests(pb.VisualizeRequest), followed("Visualize"), heavy=True),
    "Evaluate": Rpc(_requests(pb.EvaluateRequest), followed("Evaluate"), heavy=True),
    **{f"OIP.{name}": Rpc(_requests(getattr(oip, f"{name}Request")), unary(name, "inference"))
       for name in ("ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady", "ServerLive", "ServerReady",
                    "ServerMetadata")},
}


def item_errors(message: Message) -> Iterator[pb.ErrorStatus]:
    """Every ErrorStatus inside a reply: per-image results, a job's error."""
    if isinstance(message, pb.ErrorStatus):
        yield message
        return
    for fd, value in message.ListFields():
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            for item in value if fd.is_repeated else [value]:
                yield from item_errors(item)


def describe(request: Any) -> str:
    """A request for a failure message, without its megabytes."""
    text = str(request)
    return text if len(text) < 2000 else text[:2000] + f"... ({len(text)} characters)"


@pytest.mark.parametrize("name", RPCS)
def test_no_request_gets_internal_or_hangs(fuzzed: Fuzzed, name: str) -> None:
    rpc = RPCS[name]
    examples = max(1, EXAMPLES // 5) if rpc.heavy else EXAMPLES
    with grpc.insecure_channel(fuzzed.server.address) as channel:
        stubs = Stubs(pb_grpc.SpurguardStub(channel), oip_grpc.GRPCInferenceServiceStub(channel))
        health = health_pb2_grpc.HealthStub(channel)

        @settings(max_examples=examples, deadline=None, database=None, derandomize=SEED is None,
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(rpc.requests(realistic(fuzzed), bases(fuzzed).get(name)))
        def check(request: Any) -> None:
            fuzzed.errors.lines.clear()
            try:
                replies = rpc.send(stubs, request)
            except grpc.RpcError as error:
                assert error.code() not in FORBIDDEN, f"{name} -> {error.code().name}: {error.details()}\n{describe(request)}"
                replies = []
            bad = [e for reply in replies for e in item_errors(reply) if e.code in FORBIDDEN_NUMBERS]
            assert not bad, f"{name} replied with {bad[0]}\n{describe(request)}"
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, f"not serving after {name}\n{describe(request)}"
            assert not fuzzed.errors.lines, f"{name}: the server logged\n" + "\n".join(fuzzed.errors.lines)

        if SEED is not None:
            check = seed(int(SEED))(check)
        check()
