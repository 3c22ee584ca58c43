"""The thin client against an in-process fake server: marshalling, images, retries, errors.

The fake servicer below is test-only: it records what arrives, answers canned but well-formed
messages, and fails on demand, so the client's side of every RPC is checked without torch.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent import futures
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from spurguard.client import Client, SpurguardClientError
from spurguard import vocab as t
from spurguard.client.client import MAX_MESSAGE_BYTES
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc

SPEC_SCORE_KEYS = {"image", "predictions", "class", "logit", "bias_term", "residual", "components",
                   "spurious_alpha", "trigger", "spufix"}
SPEC_CLASS_SCORE_KEYS = {"class", "auc", "ap", "clean_mean_prob", "spurious_mean_prob",
                         "clean_frac_predicted", "spurious_frac_predicted"}
CREATED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _stamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _predictions(top: int = 2) -> list[pb.Prediction]:
    return [pb.Prediction(class_index=k, name=f"class{k}", prob=0.5 / (k + 1), logit=3.0 - k) for k in range(top)]


def _score(image: pb.Image) -> pb.ScoreResult:
    """Canned result; an encoded image equal to b"corrupt" fails like an undecodable file."""
    if image.WhichOneof("data") == "encoded" and image.encoded == b"corrupt":
        return pb.ScoreResult(
            image_id=image.id, error=pb.ErrorStatus(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad image")
        )
    return pb.ScoreResult(
        image_id=image.id,
        predictions=_predictions(),
        class_index=0,
        logit=3.0,
        bias_term=1.0,
        residual=0.25,
        components=[pb.ComponentAlpha(index=2, alpha=1.5, label=pb.SPURIOUS),
                    pb.ComponentAlpha(index=0, alpha=0.25, label=pb.UNLABELED)],
        spurious_alpha=1.25,
        trigger=True,
        spufix=pb.SpufixResult(mode=pb.FLOOR, logit=1.75, predictions=_predictions()[::-1]),
        fit_id="fit1",
    )


class FakeSpurguard(pb_grpc.SpurguardServicer):
    """Records requests and deadlines per method; `unavailable[name]` fails that many calls first."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.requests: dict[str, list[Any]] = defaultdict(list)
        self.deadlines: dict[str, float | None] = {}
        self.unavailable: Counter[str] = Counter()
        self.errors: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.delay_s = 0.0
        self.visualize_hangs = False  # Visualize sends one message, then waits for the client to cancel
        self.visualize_cancelled = threading.Event()

    def _enter(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        self.calls[name] += 1
        if request is not None:  # None: a client stream, whose requests its method records
            self.requests[name].append(request)
        remaining = context.time_remaining()
        self.deadlines[name] = None if remaining > 1e6 else remaining  # grpc reports "none" as ~forever
        time.sleep(self.delay_s)
        if self.unavailable[name] > 0:
            self.unavailable[name] -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if name in self.errors:
            context.abort(*self.errors[name])

    def ListModels(self, request, context):
        self._enter("ListModels", request, context)
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(name="demo", backend="torch", device="cpu", num_classes=3, feature_dim=8, input_size=64,
                         digest="abc", ready=True, supports_gradients=True, fit_id="fit1", fitted_classes=[0, 2],
                         max_batch_size=32),
            pb.ModelInfo(name="remote", backend="triton", device="localhost:8001", num_classes=1000, ready=False),
        ])

    def GetModel(self, request, context):
        self._enter("GetModel", request, context)
        return pb.ModelInfo(
            name=request.model, backend="torch", device="cpu", num_classes=2, feature_dim=8, input_size=64,
            digest="abc", ready=True, classes=[pb.ClassInfo(index=0, name="cat", wnid="n02123045"),
                                               pb.ClassInfo(index=1, name="dog")],
        )

    def _fit_stream(self, job_id: str) -> Iterator[pb.FitUpdate]:
        for done in (0, 5):
            yield pb.FitUpdate(job_id=job_id, progress=pb.FitProgress(
                phase="features", images_done=done, images_total=10, classes_done=done // 5, classes_total=2,
                elapsed_s=0.5))
        yield pb.FitUpdate(job_id=job_id, summary=pb.FitSummary(
            fit_id="fit2", model="demo", digest="abc", images=10, skipped_images=1,
            classes=[pb.FitClass(class_index=0, images=4, num_components=3),
                     pb.FitClass(class_index=2, images=5, num_components=3)], elapsed_s=1.5))

    def Fit(self, request, context):
        self._enter("Fit", request, context)
        yield from self._fit_stream(request.job_id if request.HasField("job_id") else "job-auto")

    def WatchJob(self, request, context):
        self._enter("WatchJob", request, context)
        first = True
        for update in self._fit_stream(request.job_id):
            yield update
            if first and "WatchJob-fail" in self.errors:
                context.abort(*self.errors["WatchJob-fail"])
            first = False

    def _job(self, job_id: str, state: int) -> pb.Job:
        job = pb.Job(job_id=job_id, model="demo", state=state, created=_stamp(CREATED),
                     request=pb.FitRequest(model="demo", dataset="/data", classes=[0, 2], job_id=job_id),
                     progress=pb.FitProgress(phase="features", images_done=3, images_total=10))
        if state == pb.FAILED:
            job.error.CopyFrom(pb.ErrorStatus(code=grpc.StatusCode.NOT_FOUND.value[0], message="no such folder"))
        return job

    def GetJob(self, request, context):
        self._enter("GetJob", request, context)
        return self._job(request.job_id, pb.FAILED)

    def ListJobs(self, request, context):
        self._enter("ListJobs", request, context)
        return pb.ListJobsResponse(jobs=[self._job("j2", pb.RUNNING), self._job("j1", pb.QUEUED)])

    def CancelJob(self, request, context):
        self._enter("CancelJob", request, context)
        return self._job(request.job_id, pb.CANCELLED)

    def GetComponents(self, request, context):
        self._enter("GetComponents", request, context)
        components = [pb.Component(index=i, eigenvalue=4.0 - i, explained_variance=0.25, alpha_mean=0.0,
                                   alpha_floor=-1.0, alpha_max=2.0 + i, label=pb.NOT_SPURIOUS if i else pb.SPURIOUS,
                                   note="watermark" if i == 0 else "") for i in range(2)]
        response = pb.GetComponentsResponse(model=request.model, class_index=request.class_index, fit_id="fit1",
                                            images=40, num_components=5, floor_percentile=5.0, bias_term=0.5,
                                            components=components)
        if request.include_vectors:
            dim = 600_000  # 7.2 MB in all: over gRPC's default 4 MB receive limit, so the client must raise it
            vectors = np.arange(2 * dim, dtype="<f4").reshape(2, dim)
            response.vectors.CopyFrom(pb.Tensor(data=vectors.tobytes(), shape=[2, dim]))
            response.mean.CopyFrom(pb.Tensor(data=np.full(dim, 0.5, "<f4").tobytes(), shape=[dim]))
        return response

    def Label(self, request, context):
        self._enter("Label", request, context)
        updated = None if request.label == pb.UNLABELED else _stamp(CREATED)
        return pb.LabelRecord(model=request.model, fit_id="fit1", class_index=request.class_index,
                              component=request.component, label=request.label, note=request.note, updated=updated)

    def ListLabels(self, request, context):
        self._enter("ListLabels", request, context)
        history = [  # two labellers, then a clearing write, which keeps its time
            pb.LabelRecord(model=request.model, fit_id="fit1", class_index=0, component=1, label=pb.SPURIOUS,
                           note="watermark", updated=_stamp(CREATED), author="alice"),
            pb.LabelRecord(model=request.model, fit_id="fit1", class_index=0, component=1, label=pb.UNLABELED,
                           updated=_stamp(CREATED), author="bob"),
        ]
        return pb.ListLabelsResponse(fit_id="fit1", labels=[
            pb.LabelRecord(model=request.model, fit_id="fit1", class_index=0, component=1, label=pb.INCONSISTENT,
                           note="?", updated=_stamp(CREATED)),
            pb.LabelRecord(model=request.model, fit_id="fit1", class_index=0, component=2, label=pb.UNLABELED),
        ], history=history if request.history else [])

    def Visualize(self, request, context):
        self._enter("Visualize", request, context)
        png = pb.PngImage(data=b"\x89PNG fake", width=4, height=4)
        if self.visualize_hangs:
            yield pb.VisualizeUpdate(component=0, frame=pb.AttackFrame(step=0, png=png))
            while context.is_active():
                time.sleep(0.01)
            self.visualize_cancelled.set()
            return
        for component in request.components:
            yield pb.VisualizeUpdate(component=component, top_image=pb.TopImage(rank=0, image_id="0/a.png",
                                                                                 alpha=2.0, png=png))
            yield pb.VisualizeUpdate(component=component, heatmap=pb.Heatmap(rank=0, image_id="0/a.png", alpha=2.0,
                                                                             method=pb.GRAD_CAM, png=png))
            yield pb.VisualizeUpdate(component=component, frame=pb.AttackFrame(step=0, alpha=0.1, prob=0.2, png=png))
            yield pb.VisualizeUpdate(component=component, result=pb.AttackResult(
                start_alpha=0.1, final_alpha=9.0, final_prob=0.9, steps=request.steps, png=png))

    def Score(self, request, context):
        self._enter("Score", request, context)
        return pb.ScoreResponse(results=[_score(image) for image in request.images])

    def ScoreStream(self, request_iterator, context):
        """Replies to each pair of requests in reverse order, to exercise the client's reordering."""
        self._enter("ScoreStream", None, context)
        held = []
        for request in request_iterator:
            self.requests["ScoreStream"].append(request)
            held.append(pb.ScoreStreamResponse(request_id=request.request_id, result=_score(request.image)))
            if len(held) == 2:
                yield from reversed(held)
                held.clear()
        yield from held

    def Evaluate(self, request, context):
        self._enter("Evaluate", request, context)
        yield pb.EvaluateUpdate(progress=pb.EvaluateProgress(phase="clean", images_done=5, images_total=10))
        row = pb.ClassScore(class_index=1, auc=0.75, ap=0.8, clean_mean_prob=0.6, spurious_mean_prob=0.3,
                            clean_frac_predicted=0.7, spurious_frac_predicted=0.2)
        table = pb.ScoreTable(mean_auc=0.75, mean_ap=0.8, classes=[row], clean_accuracy=0.9,
                              spurious_frac_predicted=0.2)
        yield pb.EvaluateUpdate(result=pb.EvaluateResult(model=request.model, fit_id="fit1", baseline=table,
                                                         spufix=table, spufix_mode=pb.PAPER, clean_images=6,
                                                         spurious_images=4, skipped_images=2))


@pytest.fixture
def fake() -> FakeSpurguard:
    return FakeSpurguard()


@pytest.fixture
def target(fake: FakeSpurguard) -> Iterator[str]:
    limits = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
              ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=limits)
    pb_grpc.add_SpurguardServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(target: str) -> Iterator[Client]:
    with Client(target, timeout=10.0, retries=3) as c:
        yield c


def test_import_pulls_in_neither_torch_nor_pil() -> None:
    code = 'import spurguard.client, sys; assert "torch" not in sys.modules and "PIL" not in sys.modules'
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- models ----

def test_list_and_get_model(client: Client, fake: FakeSpurguard) -> None:
    demo, remote = client.list_models()
    assert demo == t.ModelInfo(name="demo", backend="torch", device="cpu", num_classes=3, feature_dim=8,
                               input_size=64, digest="abc", ready=True, supports_gradients=True, fit_id="fit1",
                               fitted_classes=(0, 2), max_batch_size=32, classes=())
    assert remote.fit_id is None and not remote.ready
    model = client.get_model("demo")
    assert fake.requests["GetModel"][0].model == "demo"
    assert model.classes == (t.ClassInfo(0, "cat", "n02123045"), t.ClassInfo(1, "dog", None))


# ---- fit jobs ----

def test_fit_streams_progress_then_summary(client: Client, fake: FakeSpurguard) -> None:
    updates = list(client.fit("demo", "/data", classes=[0, 2], num_components=3))
    request = fake.requests["Fit"][0]
    sent = (request.model, request.dataset, list(request.classes), request.num_components)
    assert sent == ("demo", "/data", [0, 2], 3)
    assert not request.HasField("batch_size") and not request.HasField("job_id") and not request.extend
    assert [type(u) for u in updates] == [t.FitProgress, t.FitProgress, t.FitSummary]
    assert updates[1] == t.FitProgress("job-auto", "features", 5, 10, 1, 2, 0.5)
    summary = updates[-1]
    assert summary.fit_id == "fit2" and summary.job_id == "job-auto" and summary.skipped_images == 1
    assert summary.classes == (t.FitClass(0, 4, 3), t.FitClass(2, 5, 3))


def test_fit_job_id_and_extend_are_sent(client: Client, fake: FakeSpurguard) -> None:
    *_, summary = client.fit("demo", "/data", job_id="mine", extend=True, batch_size=16)
    request = fake.requests["Fit"][0]
    assert request.job_id == "mine" and request.extend and request.batch_size == 16
    assert summary.job_id == "mine"


def test_jobs(client: Client, fake: FakeSpurguard) -> None:
    job = client.get_job("j9")
    assert job.job_id == "j9" and job.state == "failed"
    assert job.error == t.ErrorStatus("NOT_FOUND", "no such folder")
    assert job.created == CREATED and job.updated is None and job.summary is None
    assert job.request == t.FitRequest("demo", "/data", (0, 2), None, None, "j9", False)
    assert job.progress is not None and job.progress.images_done == 3
    assert [j.state for j in client.list_jobs()] == ["running", "queued"]
    assert not fake.requests["ListJobs"][0].HasField("model")
    client.list_jobs(model="demo")
    assert fake.requests["ListJobs"][1].model == "demo"
    assert client.cancel_job("j9").state == "cancelled"


def test_watch_job_surfaces_a_failing_job_mid_stream(client: Client, fake: FakeSpurguard) -> None:
    fake.errors["WatchJob-fail"] = (grpc.StatusCode.FAILED_PRECONDITION, "dataset vanished")
    updates = client.watch_job("j1")
    assert isinstance(next(updates), t.FitProgress)
    with pytest.raises(SpurguardClientError) as caught:
        next(updates)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details == "dataset vanished"
    assert str(caught.value) == "FAILED_PRECONDITION: dataset vanished"


def test_a_stream_cancelled_from_another_thread_ends_quietly_and_cancels_the_call(
    client: Client, fake: FakeSpurguard
) -> None:
    """What a web app does when its page is left: the worker thread waiting in `next` returns,
    and the server sees the call cancelled."""
    fake.visualize_hangs = True
    stream = client.visualize("demo", 0, [0])
    received: list[t.VisualizeUpdate] = []
    consumer = threading.Thread(target=lambda: received.extend(stream))
    consumer.start()
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert received, "the first message never arrived"
    stream.cancel()
    consumer.join(timeout=5)
    assert not consumer.is_alive() and len(received) == 1
    assert fake.visualize_cancelled.wait(timeout=5)
    assert next(stream, None) is None  # stays ended


# ---- components and labels ----

def test_get_components(client: Client, fake: FakeSpurguard) -> None:
    result = client.get_components("demo", 3, top=2)
    request = fake.requests["GetComponents"][0]
    assert request.class_index == 3 and request.top == 2 and not request.include_vectors
    assert not request.HasField("fit_id")
    assert result.vectors is None and result.mean is None
    assert result.components[0] == t.Component(0, 4.0, 0.25, 0.0, -1.0, 2.0, "spurious", "watermark")
    assert result.components[1].label == "not_spurious"
    document = result.to_dict()  # SPEC's keys, then the fit's context (fit_id, floor_percentile, ...)
    assert {key: document[key] for key in ("model", "class", "images", "components")} == {
        "model": "demo", "class": 3, "images": 40,
        "components": [c.to_dict() for c in result.components],
    }
    assert set(result.to_dict()["components"][0]) == {
        "index", "eigenvalue", "explained_variance", "alpha_mean", "alpha_floor", "alpha_max", "label", "note"}


def test_get_components_vectors_arrive_as_float32_arrays(client: Client) -> None:
    result = client.get_components("demo", 0, include_vectors=True, fit_id="fit1")
    assert result.vectors is not None and result.mean is not None
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (2, 600_000)
    np.testing.assert_array_equal(result.vectors.ravel(), np.arange(1_200_000, dtype=np.float32))
    assert result.mean.shape == (600_000,) and float(result.mean[0]) == 0.5


def test_label_and_list_labels(client: Client, fake: FakeSpurguard) -> None:
    record = client.label("demo", 0, 2, "spurious", note="watermark")
    request = fake.requests["Label"][0]
    assert request.label == pb.SPURIOUS and request.note == "watermark" and request.component == 2
    assert record == t.LabelRecord("demo", "fit1", 0, 2, "spurious", "watermark", CREATED)
    cleared = client.label("demo", 0, 2, "unlabeled")
    assert cleared.label == "unlabeled" and cleared.updated is None
    labels = client.list_labels("demo", class_index=0, label="unlabeled")
    request = fake.requests["ListLabels"][0]
    assert request.class_index == 0 and request.HasField("label") and request.label == pb.UNLABELED
    assert [(x.component, x.label) for x in labels] == [(1, "inconsistent"), (2, "unlabeled")]
    client.list_labels("demo")
    assert not fake.requests["ListLabels"][1].HasField("class_index")
    assert not fake.requests["ListLabels"][1].HasField("label")
    with pytest.raises(ValueError, match="label must be one of"):
        client.label("demo", 0, 2, "harmful")
    assert fake.calls["Label"] == 2


def test_label_history_and_the_component_filter(client: Client, fake: FakeSpurguard) -> None:
    assert [x.component for x in client.list_labels("demo", class_index=0, component=1)] == [1, 2]  # the fake's
    request = fake.requests["ListLabels"][-1]
    assert (request.class_index, request.component, request.history) == (0, 1, False)
    history = client.label_history("demo", class_index=0, component=1, fit_id="fit1")
    request = fake.requests["ListLabels"][-1]
    assert (request.class_index, request.component, request.fit_id, request.history) == (0, 1, "fit1", True)
    assert not request.HasField("label")  # the label filter does not apply to the history
    assert history == [t.LabelRecord("demo", "fit1", 0, 1, "spurious", "watermark", CREATED, "alice"),
                       t.LabelRecord("demo", "fit1", 0, 1, "unlabeled", "", CREATED, "bob")]
    client.label_history("demo")
    request = fake.requests["ListLabels"][-1]
    assert not request.HasField("class_index") and not request.HasField("component") and request.history


def test_values_out_of_a_fields_range_name_the_argument(client: Client, fake: FakeSpurguard) -> None:
    """protobuf alone says only "Value out of range: 99999999999"."""
    with pytest.raises(ValueError, match=r"^GetComponentsRequest.top: Value out of range: 99999999999"):
        client.get_components("demo", 0, top=99999999999)
    with pytest.raises(ValueError, match=r"^ScoreOptions.top: .*4294967296"):
        client.score("demo", [b"x"], top=2**32)
    with pytest.raises(ValueError, match=r"^LabelRequest.class_index: .*2147483648"):
        client.label("demo", 2**31, 0, "spurious")
    with pytest.raises(ValueError, match=r"^VisualizeRequest.components: .*-1"):
        client.visualize("demo", 0, [-1])
    with pytest.raises(TypeError, match=r"^FitRequest.num_components: "):  # a wrong type stays a TypeError
        client.fit("demo", "/data", num_components="3")  # type: ignore[arg-type]
    assert sum(fake.calls.values()) == 0


# ---- visualize ----

def test_visualize(client: Client, fake: FakeSpurguard) -> None:
    updates = list(client.visualize("demo", 1, [0, 3], steps=20, eps=5.0, frame_every=5, top_k=4, seed=7,
                                    heatmap="input_gradient"))
    request = fake.requests["Visualize"][0]
    assert list(request.components) == [0, 3] and request.steps == 20 and request.eps == 5.0
    assert (request.frame_every, request.top_k, request.seed, request.heatmap) == (5, 4, 7, pb.INPUT_GRADIENT)
    assert not request.HasField("fit_id") and not request.HasField("heatmap_layer")
    list(client.visualize("demo", 1, [0], heatmap_layer="layer4"))
    assert fake.requests["Visualize"][1].heatmap_layer == "layer4"
    kinds = [t.TopImage, t.Heatmap, t.AttackFrame, t.AttackResult]
    assert [type(u) for u in updates] == kinds * 2
    assert updates[0] == t.TopImage(0, 0, "0/a.png", "", 2.0, b"\x89PNG fake")
    assert updates[1].method == "grad_cam"
    assert updates[-1] == t.AttackResult(3, 0.1, 9.0, 0.9, 20, 0.0, b"\x89PNG fake")
    with pytest.raises(ValueError, match="heatmap"):
        client.visualize("demo", 1, [0], heatmap="smoothgrad")


# ---- score ----

def test_score_image_types(client: Client, fake: FakeSpurguard, tmp_path: Path) -> None:
    path = tmp_path / "cat.jpg"
    path.write_bytes(b"\xff\xd8 jpeg bytes \x00\x01")
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = np.zeros((4, 6), np.uint8)
    strided = rgb[:, ::2]  # not contiguous: must still arrive as dense HWC
    results = client.score("demo", [path, str(path), b"png bytes", rgb, gray, ("named", strided)])
    images = fake.requests["Score"][0].images
    assert [i.id for i in images] == [str(path), str(path), "2", "3", "4", "named"]
    assert images[0].encoded == path.read_bytes() and images[1].encoded == path.read_bytes()
    assert images[2].encoded == b"png bytes"
    for image, array in ((images[3], rgb), (images[4], gray[:, :, None]), (images[5], strided)):
        raw = image.raw
        assert (raw.height, raw.width, raw.channels) == array.shape
        np.testing.assert_array_equal(np.frombuffer(raw.data, np.uint8).reshape(array.shape), array)
    assert [r.image_id for r in results] == [i.id for i in images]


def test_score_pil_images_arrive_raw(client: Client, fake: FakeSpurguard) -> None:
    Image = pytest.importorskip("PIL.Image")
    rgb = Image.new("RGB", (7, 5), (10, 20, 30))
    palette = Image.new("P", (3, 2))
    client.score("demo", [rgb, palette])
    first, second = fake.requests["Score"][0].images
    assert (first.raw.height, first.raw.width, first.raw.channels) == (5, 7, 3)
    assert first.raw.data[:3] == bytes([10, 20, 30])
    assert second.raw.channels == 3  # palette images are converted to RGB


def test_score_rejects_bad_inputs_locally(client: Client, fake: FakeSpurguard, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        client.score("demo", [np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="HxW"):
        client.score("demo", [np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(TypeError, match="unsupported image type"):
        client.score("demo", [3.5])
    with pytest.raises(FileNotFoundError):
        client.score("demo", [tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="spufix"):
        client.score("demo", [b"x"], spufix="max_cov")
    assert fake.calls["Score"] == 0


def test_score_results_and_options(client: Client, fake: FakeSpurguard) -> None:
    ok, bad = client.score("demo", [b"fine", b"corrupt"], class_index=0, top=0, spufix="floor")
    options = fake.requests["Score"][0].options
    assert options.HasField("class_index") and options.class_index == 0
    assert options.HasField("top") and options.top == 0 and options.spufix == pb.FLOOR
    assert bad.error == t.ErrorStatus("INVALID_ARGUMENT", "bad image")
    assert bad.to_dict() == {"image": "1", "error": {"code": "INVALID_ARGUMENT", "message": "bad image"}}
    assert ok.error is None and ok.fit_id == "fit1" and ok.trigger
    line = ok.to_dict()
    assert set(line) == SPEC_SCORE_KEYS | {"fit_id", "transfer_id"}  # and the fit (and transfer) that scored it
    assert line["predictions"][0] == {"class": 0, "name": "class0", "prob": 0.5, "logit": 3.0}
    assert line["components"] == [{"index": 2, "alpha": 1.5, "label": "spurious"},
                                  {"index": 0, "alpha": 0.25, "label": "unlabeled"}]
    assert (line["class"], line["bias_term"], line["residual"], line["spurious_alpha"]) == (0, 1.0, 0.25, 1.25)
    assert line["spufix"]["mode"] == "floor" and line["spufix"]["logit"] == 1.75
    assert line["spufix"]["predictions"][0]["class"] == 1
    client.score("demo", [b"fine"])
    default = fake.requests["Score"][1].options
    assert not default.HasField("class_index") and not default.HasField("top")
    assert default.spufix == pb.SPUFIX_MODE_DEFAULT


def test_score_splits_batches_and_keeps_order(client: Client, fake: FakeSpurguard) -> None:
    results = client.score("demo", [bytes([i]) for i in range(5)], batch_size=2)
    assert [len(r.images) for r in fake.requests["Score"]] == [2, 2, 1]
    assert [r.image_id for r in results] == ["0", "1", "2", "3", "4"]


def test_score_image_over_the_message_limit_fails_alone(client: Client, fake: FakeSpurguard) -> None:
    huge = np.zeros((MAX_MESSAGE_BYTES // 3 + 1, 1, 3), np.uint8)
    first, second, third = client.score("demo", [b"a", huge, b"c"])
    assert second.error is not None and second.error.code == "RESOURCE_EXHAUSTED"
    assert first.error is None and third.error is None and (first.image_id, third.image_id) == ("0", "2")
    assert [len(r.images) for r in fake.requests["Score"]] == [2]


# ---- score stream ----

def test_score_stream_yields_in_input_order(client: Client, fake: FakeSpurguard) -> None:
    images = (bytes([i]) if i != 3 else b"corrupt" for i in range(5))  # a lazy iterable
    results = list(client.score_stream("demo", images, top=3, spufix="paper"))
    requests = fake.requests["ScoreStream"]
    assert [r.request_id for r in requests] == ["0", "1", "2", "3", "4"]
    assert all(r.model == "demo" and r.options.top == 3 and r.options.spufix == pb.PAPER for r in requests)
    assert [r.image_id for r in results] == ["0", "1", "2", "3", "4"]
    assert results[3].error is not None and results[0].error is None and results[0].fit_id == "fit1"


def test_score_stream_reraises_local_input_errors(client: Client, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        list(client.score_stream("demo", [b"ok", tmp_path / "missing.png"]))


# ---- evaluate ----

def test_evaluate(client: Client, fake: FakeSpurguard) -> None:
    progress, result = client.evaluate("demo", "/clean", "/spurious", spufix="paper", classes=[1])
    request = fake.requests["Evaluate"][0]
    assert (request.clean, request.spurious, request.spufix, list(request.classes)) == (
        "/clean", "/spurious", pb.PAPER, [1])
    assert progress == t.EvaluateProgress("clean", 5, 10, 0.0)
    assert isinstance(result, t.EvaluateResult) and result.spufix_mode == "paper"
    assert (result.clean_images, result.spurious_images, result.skipped_images) == (6, 4, 2)
    document = result.to_dict()
    assert {"mean_auc", "mean_ap", "classes", "spufix"} <= set(document)
    assert set(document["classes"][0]) == SPEC_CLASS_SCORE_KEYS
    assert document["spufix"]["mode"] == "paper" and document["spufix"]["classes"][0]["class"] == 1


# ---- retries, deadlines, errors ----

@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("ListModels", lambda c: c.list_models()),
        ("GetModel", lambda c: c.get_model("demo")),
        ("GetComponents", lambda c: c.get_components("demo", 0)),
        ("ListLabels", lambda c: c.list_labels("demo")),
        ("GetJob", lambda c: c.get_job("j")),
        ("Score", lambda c: c.score("demo", [b"x"])),
    ],
)
def test_idempotent_calls_retry_on_unavailable(client: Client, fake: FakeSpurguard, method: str, call: Any) -> None:
    fake.unavailable[method] = 2
    call(client)
    assert fake.calls[method] == 3


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("Fit", lambda c: list(c.fit("demo", "/data"))),
        ("Label", lambda c: c.label("demo", 0, 1, "spurious")),
        ("CancelJob", lambda c: c.cancel_job("j")),
        ("Evaluate", lambda c: list(c.evaluate("demo", "/a", "/b"))),
    ],
)
def test_other_calls_do_not_retry(client: Client, fake: FakeSpurguard, method: str, call: Any) -> None:
    fake.unavailable[method] = 1
    with pytest.raises(SpurguardClientError) as caught:
        call(client)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert fake.calls[method] == 1


def test_retries_are_bounded(client: Client, fake: FakeSpurguard) -> None:
    fake.unavailable["GetModel"] = 10
    with pytest.raises(SpurguardClientError) as caught:
        client.get_model("demo")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert fake.calls["GetModel"] == 1 + client.retries


def test_connection_refused_is_retried_within_the_deadline() -> None:
    """Connection refused is UNAVAILABLE too (a client may start before its server): retried, bounded."""
    with Client("127.0.0.1:1", timeout=1.0, retries=2) as c:
        start = time.monotonic()
        with pytest.raises(SpurguardClientError) as caught:
            c.list_models()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 1.5  # backoff stays inside the deadline


WIRE_ROUNDING_S = 0.5


def test_unary_calls_carry_the_deadline_and_streams_none_by_default(client: Client, fake: FakeSpurguard) -> None:
    client.get_model("demo")
    list(client.fit("demo", "/data"))
    remaining = fake.deadlines["GetModel"]
    # the wire encodes the timeout coarsely (rounded up), so the server may see a hair more
    assert remaining is not None and 0 < remaining <= client.timeout + WIRE_ROUNDING_S
    assert fake.deadlines["Fit"] is None


def test_deadline_exceeded_is_not_retried(target: str, fake: FakeSpurguard) -> None:
    fake.delay_s = 0.5
    with Client(target, timeout=0.2, retries=3) as c:
        with pytest.raises(SpurguardClientError) as caught:
            c.get_model("demo")
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fake.calls["GetModel"] == 1


def test_stream_timeout_applies_to_streams(target: str, fake: FakeSpurguard) -> None:
    with Client(target, stream_timeout=5.0) as c:
        list(c.fit("demo", "/data"))
    remaining = fake.deadlines["Fit"]
    assert remaining is not None and 0 < remaining <= 5.0 + WIRE_ROUNDING_S


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_status_codes_map_to_client_errors(client: Client, fake: FakeSpurguard, code: grpc.StatusCode) -> None:
    fake.errors["GetModel"] = (code, "model nope is not loaded")
    with pytest.raises(SpurguardClientError) as caught:
        client.get_model("nope")
    assert caught.value.code == code and caught.value.details == "model nope is not loaded"
    assert fake.calls["GetModel"] == 1


def test_closing_the_client_closes_the_channel(target: str) -> None:
    with Client(target) as c:
        assert c.list_models()
    with pytest.raises(ValueError):  # grpc refuses calls on a closed channel
        c.list_models()
