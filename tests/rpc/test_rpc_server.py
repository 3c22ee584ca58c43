"""The gRPC server end to end, driven through spurguard.client.Client.

One in-process server (BackgroundServer, port 0) serves two models for the module: `tiny`, a
TorchScript model directory written here, and `gated`, an in-process backend whose forward
pass waits on a gate, so tests can hold a fit job mid-run (disconnect, cancel). A subprocess
server checks the real entry point: the ready line, SIGTERM and graceful shutdown.
"""
from __future__ import annotations

import asyncio
import math
import os
import queue
import random
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2 as oip_pb
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from spurguard.client import Client, FitProgress, FitSummary, SpurguardClientError
from spurguard.vocab import EvaluateResult
from spurguard.server.backends import PreprocessConfig, TorchBackend, load_model
from spurguard.server.serving.evaluation import run_evaluate
from spurguard.server.serving.guard import Guard
from spurguard.server.errors import InvalidInput
from spurguard.server.rpc import servicer as servicer_module
from spurguard.server.serving.dataplane import DataPlane
from spurguard.server.rpc.app import (
    BackgroundServer,
    ServerConfig,
    SpurguardServer,
    build_parser,
    config_from_args,
    main,
)
from spurguard.server.rpc.process import ServerProcess
from spurguard.server.store import Store
from spurguard.server.store.faults import CRASH_ENV
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc

from rpc_support import Gated, png, random_png, scrape_metrics, write_data_root

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from backends_support import (  # noqa: E402
    CLASSES,
    FEATURES,
    SIZE,
    TinyCNN,
    write_tiny_model_dir,
)

PER_CLASS = 10
COMPONENTS = 4
MAX_REQUEST_IMAGES = 8
CODE = grpc.StatusCode
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def _huge_png() -> bytes:
    """A valid PNG header that declares 50000 x 50000 pixels: rejected before any decoding."""
    data = bytearray(png(np.zeros((1, 1, 3), np.uint8)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", 50_000, 50_000)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


class GatedCNN(Gated, TinyCNN):
    """TinyCNN whose forward waits while `gate` is clear (holds work mid-run) and counts its calls."""


def _gated_backend() -> tuple[TorchBackend, GatedCNN]:
    torch.manual_seed(2)
    module = GatedCNN().eval()
    generator = torch.Generator().manual_seed(3)
    backend = TorchBackend(
        name="gated",
        digest="1" * 64,
        backbone=module,
        weight=torch.randn(CLASSES, FEATURES, generator=generator),
        bias=torch.randn(CLASSES, generator=generator),
        preprocess_config=PreprocessConfig(SIZE, 20, "bilinear", (0.5,) * 3, (0.25,) * 3),
        device="cpu",
        max_batch_size=4,
        runtime="torch",  # the gate is Python code in the torch module: an ONNX runtime would pass it by
    )
    return backend, module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's data root: train/<class>/ and a Spurious ImageNet folder for class 0."""
    return write_data_root(tmp_path_factory.mktemp("data"), CLASSES, PER_CLASS, spurious=6)


@pytest.fixture(scope="module")
def gated() -> tuple[TorchBackend, GatedCNN]:
    return _gated_backend()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def server(model_dir: Path, data: Path, store_dir: Path, gated) -> Iterator[BackgroundServer]:  # noqa: ANN001
    config = ServerConfig(
        models=(str(model_dir),),
        store=store_dir,
        port=0,
        metrics_port=0,
        data_roots=(data,),
        device="cpu",
        max_delay_ms=2.0,
        max_request_images=MAX_REQUEST_IMAGES,
        grace_s=2.0,
    )
    with BackgroundServer(config, backends=[gated[0]]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def fitted(client: Client, data: Path) -> tuple[list[Any], FitSummary]:
    """Classes 0 and 1 of `tiny` fitted (2 stays unfitted), component 0 of class 0 labelled spurious."""
    updates = list(client.fit("tiny", str(data / "train"), classes=[0, 1], num_components=COMPONENTS))
    summary = updates[-1]
    assert isinstance(summary, FitSummary)
    client.label("tiny", 0, 0, "spurious", note="background")
    return updates, summary


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SpurguardClientError) as caught:
        call()
    return caught.value.code, caught.value.details


def _assert_close(got: Any, want: Any, path: str = "") -> None:
    """Nested dicts / lists equal, floats to 1e-5."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            _assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5), f"{path}: {got} != {want}"
    else:
        assert got == want, path


def _reference_scores(model_dir: Path, store_dir: Path, images: list[tuple[str, bytes]], **options: Any) -> list[dict]:
    """What an in-process Guard says about the same images: the numbers the server must send."""
    backend = load_model(str(model_dir), "cpu")
    guard = Guard.load(backend, Store(store_dir))
    features = backend.features(backend.preprocess([data for _, data in images]))
    return [s.to_dict() for s in guard.score_features(features, [i for i, _ in images], **options)]


# ---- models, health, reflection ----


def test_list_and_get_model(client: Client, fitted) -> None:  # noqa: ANN001
    _, summary = fitted
    models = {m.name: m for m in client.list_models()}
    assert sorted(models) == ["gated", "tiny"]
    assert models["tiny"].ready and models["tiny"].classes == ()
    info = client.get_model("tiny")
    assert (info.backend, info.device, info.num_classes, info.feature_dim, info.input_size) == (
        "torch", "cpu", CLASSES, FEATURES, SIZE,
    )
    assert info.supports_gradients and len(info.digest) == 64
    assert info.fit_id == summary.fit_id and info.fitted_classes == (0, 1)
    assert [(c.index, c.name, c.wnid) for c in info.classes] == [
        (0, "tench", "n01440764"), (1, "plain name", None), (2, "goldfish", "n01443537"),
    ]


def test_health_per_model_and_reflection(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "spurguard.v1.Spurguard", "liveness", "tiny", "gated"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert caught.value.code() == CODE.NOT_FOUND
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN  # it may appear later
        unknown.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"spurguard.v1.Spurguard", "grpc.health.v1.Health"} <= names


def test_health_is_not_serving_until_the_model_is_warm(tmp_path: Path) -> None:
    backend, module = _gated_backend()
    module.gate.clear()  # warm-up runs a forward pass: it waits here

    async def check() -> None:
        server = SpurguardServer(ServerConfig(models=(), store=tmp_path, port=0, device="cpu"), backends=[backend])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def statuses() -> list[int]:
                    names = ("", "spurguard.v1.Spurguard", "gated")
                    return [(await health.Check(health_pb2.HealthCheckRequest(service=s))).status for s in names]

                assert await statuses() == [health_pb2.HealthCheckResponse.NOT_SERVING] * 3
                live = await health.Check(health_pb2.HealthCheckRequest(service="liveness"))
                assert live.status == health_pb2.HealthCheckResponse.SERVING  # alive while it loads
                stub = pb_grpc.SpurguardStub(channel)
                assert not (await stub.GetModel(pb.GetModelRequest(model="gated"))).ready
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Score(pb.ScoreRequest(model="gated", images=[pb.Image(id="x", encoded=b"x")]))
                assert caught.value.code() == CODE.UNAVAILABLE and "loading" in caught.value.details()
                module.gate.set()
                await asyncio.wait_for(server.wait_ready(), 20)
                assert await statuses() == [health_pb2.HealthCheckResponse.SERVING] * 3
        finally:
            module.gate.set()
            await server.stop(0, drain_delay=0)

    asyncio.run(check())


# ---- fit, components, labels ----


def test_fit_streams_progress_then_summary(fitted) -> None:  # noqa: ANN001
    updates, summary = fitted
    progress = updates[:-1]
    assert progress and all(isinstance(u, FitProgress) for u in progress)
    assert {u.job_id for u in updates} == {summary.job_id} and summary.fit_id == summary.job_id
    assert progress[-1].images_done == progress[-1].images_total == 2 * PER_CLASS
    assert [(c.class_index, c.images, c.num_components) for c in summary.classes] == [
        (0, PER_CLASS, COMPONENTS), (1, PER_CLASS, COMPONENTS),
    ]
    assert summary.model == "tiny" and summary.images == 2 * PER_CLASS and summary.skipped_images == 0


def test_get_components_matches_the_store(client: Client, fitted, store_dir: Path) -> None:  # noqa: ANN001
    _, summary = fitted
    got = client.get_components("tiny", 0, include_vectors=True)
    info = client.get_model("tiny")
    stored = Store(store_dir).load_fit("tiny", info.digest, summary.fit_id).components(0)
    assert (got.fit_id, got.images, got.num_components, got.floor_percentile) == (summary.fit_id, PER_CLASS, COMPONENTS, 5.0)
    np.testing.assert_allclose([c.eigenvalue for c in got.components], stored.eigenvalues, rtol=1e-12)
    np.testing.assert_allclose([c.alpha_floor for c in got.components], stored.alpha_floor(), rtol=1e-12)
    np.testing.assert_allclose(got.vectors, stored.vectors, atol=1e-6)
    assert [(c.label, c.note) for c in got.components][:2] == [("spurious", "background"), ("unlabeled", "")]
    top = client.get_components("tiny", 0, top=2)
    assert [c.index for c in top.components] == [0, 1] and top.num_components == COMPONENTS and top.vectors is None


def test_label_and_list_labels(client: Client, fitted) -> None:  # noqa: ANN001
    _, summary = fitted
    record = client.label("tiny", 1, 2, "inconsistent", note="mixed")
    assert (record.fit_id, record.class_index, record.component, record.label, record.note) == (
        summary.fit_id, 1, 2, "inconsistent", "mixed",
    )
    assert record.updated is not None
    labelled = {(r.class_index, r.component): r.label for r in client.list_labels("tiny")}
    assert labelled[(0, 0)] == "spurious" and labelled[(1, 2)] == "inconsistent"
    unlabelled = client.list_labels("tiny", class_index=1, label="unlabeled")
    assert [r.component for r in unlabelled] == [0, 1, 3]
    cleared = client.label("tiny", 1, 2, "unlabeled")
    assert cleared.label == "unlabeled" and cleared.updated is None
    assert (1, 2) not in {(r.class_index, r.component) for r in client.list_labels("tiny")}
    written = client.label_history("tiny", class_index=1, component=2)
    assert [(r.label, r.note) for r in written][-2:] == [("inconsistent", "mixed"), ("unlabeled", "")]
    assert record.author == "" and {r.author for r in written} == {""}  # no --auth-tokens: no author


def test_a_second_server_on_the_same_store_follows_labels_made_elsewhere(
    client: Client, fitted, model_dir: Path, store_dir: Path  # noqa: ANN001
) -> None:
    """Replicas share a store: a label made through one server reaches another's scores."""
    config = ServerConfig(models=(str(model_dir),), store=store_dir, port=0, device="cpu", store_poll_s=0.1)
    images = _images(7, 2)

    def labels_seen(other: Client) -> set[str]:
        results = other.score("tiny", images, class_index=1, top=0)
        return {next(c.label for c in r.components if c.index == 1) for r in results}

    def wait_for(other: Client, label: str) -> None:
        deadline = time.monotonic() + 10
        while labels_seen(other) != {label}:
            assert time.monotonic() < deadline, f"the second server never saw {label!r}"
            time.sleep(0.05)

    with BackgroundServer(config) as second, Client(second.address, timeout=30) as other:
        assert labels_seen(other) == {"unlabeled"}
        client.label("tiny", 1, 1, "spurious", note="made on the first server")
        try:
            wait_for(other, "spurious")
        finally:
            client.label("tiny", 1, 1, "unlabeled")
        wait_for(other, "unlabeled")


# ---- score ----


def _images(seed: int, count: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    return [(f"img-{seed}-{i}", random_png(rng)) for i in range(count)]


def test_score_equals_the_in_process_guard(client: Client, fitted, model_dir: Path, store_dir: Path) -> None:  # noqa: ANN001
    _, summary = fitted
    images = _images(1, 6)
    for options in ({}, {"class_index": 0, "top": 0, "spufix": "paper"}):
        results = client.score("tiny", images, **options)
        assert all(r.error is None and r.fit_id == summary.fit_id for r in results)
        reference = _reference_scores(
            model_dir, store_dir, images,
            class_index=options.get("class_index"), top=options.get("top", 5), mode=options.get("spufix", "floor"),
        )
        _assert_close([r.to_dict() for r in results], reference)
    analysed = client.score("tiny", images, class_index=0, top=0)
    assert all(r.components[0].label in ("spurious", "unlabeled") for r in analysed)
    assert any(r.spufix.logit < r.logit for r in analysed)  # the spurious label acts


def test_score_of_an_unfitted_class_reports_no_decomposition(client: Client, fitted) -> None:  # noqa: ANN001
    (result,) = client.score("tiny", _images(2, 1), class_index=2)
    assert result.class_index == 2 and result.bias_term is None and result.residual is None
    assert result.components == () and result.spurious_alpha == 0.0 and not result.trigger


def test_bad_images_fail_alone(client: Client, fitted) -> None:  # noqa: ANN001
    good = _images(3, 2)
    pixels = np.random.default_rng(4).integers(0, 256, (24, 18, 3), dtype=np.uint8)
    batch = [good[0], ("corrupt", b"\x89PNG\r\n\x1a\nnot really"), ("empty", b""), ("huge", _huge_png()),
             ("raw", pixels), good[1]]
    results = client.score("tiny", batch)
    assert [r.image_id for r in results] == ["img-3-0", "corrupt", "empty", "huge", "raw", "img-3-1"]
    errors = {r.image_id: r.error for r in results if r.error is not None}
    assert sorted(errors) == ["corrupt", "empty", "huge"]
    assert errors["corrupt"].code == "INVALID_ARGUMENT" and "image" in errors["corrupt"].message
    assert errors["empty"].code == "INVALID_ARGUMENT" and "empty" in errors["empty"].message
    assert errors["huge"].code == "RESOURCE_EXHAUSTED" and "pixels" in errors["huge"].message
    raw_alone = client.score("tiny", [("raw", png(pixels))])[0]  # raw pixels score like their PNG
    _assert_close(results[4].to_dict(), raw_alone.to_dict())


def test_score_stream_serves_concurrent_clients_in_order(server: BackgroundServer, fitted, model_dir: Path, store_dir: Path) -> None:  # noqa: ANN001
    batches = {seed: _images(seed, 12) for seed in range(10, 14)}

    def stream(seed: int) -> list[dict]:
        with Client(server.address) as own:
            return [r.to_dict() for r in own.score_stream("tiny", batches[seed], top=0)]

    with ThreadPoolExecutor(len(batches)) as pool:
        got = dict(zip(batches, pool.map(stream, batches)))
    everything = [image for seed in batches for image in batches[seed]]
    reference = iter(_reference_scores(model_dir, store_dir, everything, top=0))
    for seed in batches:
        _assert_close(got[seed], [next(reference) for _ in batches[seed]])


def test_score_stream_with_a_small_window_still_answers_everything(
    server: BackgroundServer, fitted, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    monkeypatch.setattr(servicer_module, "STREAM_WINDOW", 2)
    images = _images(15, 10)
    with Client(server.address, stream_timeout=30) as own:
        assert [r.image_id for r in own.score_stream("tiny", images)] == [i for i, _ in images]


def test_score_stream_reports_bad_messages_per_message(client: Client, fitted) -> None:  # noqa: ANN001
    bad, good = client.score_stream("tiny", [("bad", b"junk"), *_images(5, 1)])
    assert bad.error.code == "INVALID_ARGUMENT" and good.error is None and good.predictions
    (out_of_range,) = client.score_stream("tiny", _images(5, 1), class_index=7)
    assert out_of_range.error.code == "NOT_FOUND" and "0..2" in out_of_range.error.message
    (unknown,) = client.score_stream("nope", _images(6, 1))
    assert unknown.error.code == "NOT_FOUND" and "nope" in unknown.error.message


# ---- evaluate ----


def test_evaluate_streams_progress_then_the_in_process_table(client: Client, fitted, data: Path, model_dir: Path, store_dir: Path) -> None:  # noqa: ANN001
    updates = list(client.evaluate("tiny", str(data / "train"), str(data / "spurious")))
    *progress, result = updates
    assert progress and progress[-1].images_done == progress[-1].images_total == 3 * PER_CLASS + 6
    backend = load_model(str(model_dir), "cpu")
    want = run_evaluate(backend, Guard.load(backend, Store(store_dir)), data / "train", data / "spurious").result
    got = result.to_dict()
    _assert_close({**got, "evaluation_id": ""}, want.to_dict())
    assert (result.clean_images, result.spurious_images, result.fit_id) == (3 * PER_CLASS, 6, want.fit_id)
    assert (result.model, result.spufix_mode) == (want.model, want.spufix_mode) == ("tiny", "floor")
    # the server kept a copy: the same table, with the request it answered
    kept = {r["evaluation_id"]: r for r in Store(store_dir).list_evaluations("tiny", backend.digest)}
    record = kept[result.evaluation_id]
    assert {k: record[k] for k in got} == got
    assert record["request"] == {"clean": str(data / "train"), "spurious": str(data / "spurious"), "spufix": "floor",
                                 "classes": [], "batch_size": None, "directions": "both"}


def test_evaluate_stops_when_its_client_goes_away(client: Client, gated, data: Path, store_dir: Path) -> None:  # noqa: ANN001
    module = gated[1]
    module.gate.clear()
    try:
        stream = client.evaluate("gated", str(data / "train"), str(data / "spurious"), batch_size=2)
        assert next(stream).phase == "scanning"  # the first forward pass now waits at the gate
        stream.close()
        time.sleep(0.3)
        calls = module.calls
    finally:
        module.gate.set()
    time.sleep(0.5)
    assert module.calls - calls <= 2  # 18 batches without the cancel
    assert Store(store_dir).list_evaluations("gated", gated[0].digest) == []  # nothing half-kept


def test_heavy_calls_beyond_the_cap_wait_their_turn(model_dir: Path, store_dir: Path, data: Path, tmp_path: Path) -> None:
    """With --max-heavy-calls 1, a second Evaluate says it is queued and computes nothing until
    the first is done; both then finish with the same table."""
    backend, module = _gated_backend()
    config = ServerConfig(models=(), store=tmp_path / "store", port=0, device="cpu", data_roots=(data,),
                          max_heavy_calls=1)
    with BackgroundServer(config, backends=[backend]) as server, Client(server.address, timeout=60) as client:
        module.gate.clear()
        try:
            first = client.evaluate("gated", str(data / "train"), str(data / "spurious"), batch_size=2)
            assert next(first).phase == "scanning"  # holds the only slot: its forward waits at the gate
            second = client.evaluate("gated", str(data / "train"), str(data / "spurious"), batch_size=2)
            assert next(second).phase == "queued"
            deadline = time.monotonic() + 10
            while module.waiting < 1 and time.monotonic() < deadline:  # the first reaches the gate
                time.sleep(0.01)
            time.sleep(0.3)  # time enough for the second to arrive there too, were it running
            waiting = module.waiting  # without the cap: 2, one pass of each call
        finally:
            module.gate.set()
        first_result, second_result = list(first)[-1], list(second)[-1]
        assert waiting == 1
        assert first_result.evaluation_id != second_result.evaluation_id  # each kept on its own
        assert replace(first_result, evaluation_id="") == replace(second_result, evaluation_id="")
    with pytest.raises(InvalidInput, match="max_heavy_calls must be >= 1"):
        DataPlane(None, None, None, None, max_heavy_calls=0)  # type: ignore[arg-type]


# ---- errors ----


def test_error_cases_have_their_status_and_a_clear_message(client: Client, fitted, data: Path, tmp_path: Path) -> None:  # noqa: ANN001
    cases = {
        "unknown model": (lambda: client.get_model("nope"), CODE.NOT_FOUND, "nope"),
        "class out of range": (lambda: client.score("tiny", _images(7, 1), class_index=3), CODE.NOT_FOUND, "0..2"),
        "negative class": (lambda: client.get_components("tiny", -1), CODE.NOT_FOUND, "0..2"),
        "unfitted class": (lambda: client.get_components("tiny", 2), CODE.FAILED_PRECONDITION, "not fitted"),
        "unknown component": (lambda: client.label("tiny", 0, 9, "spurious"), CODE.NOT_FOUND, "0..3"),
        "unknown fit": (lambda: client.get_components("tiny", 0, fit_id="nofit"), CODE.NOT_FOUND, "nofit"),
        "batch over the limit": (
            lambda: client.score("tiny", _images(8, MAX_REQUEST_IMAGES + 1), batch_size=MAX_REQUEST_IMAGES + 1),
            CODE.RESOURCE_EXHAUSTED, str(MAX_REQUEST_IMAGES),
        ),
        "dataset outside the roots": (lambda: list(client.fit("tiny", str(tmp_path))), CODE.PERMISSION_DENIED, "data roots"),
        "dataset missing": (lambda: list(client.fit("tiny", str(data / "absent"))), CODE.NOT_FOUND, "absent"),
        "escape by ..": (lambda: list(client.fit("tiny", "train/../..")), CODE.PERMISSION_DENIED, "data roots"),
        "bad job id": (lambda: list(client.fit("tiny", "train", job_id="no/slash")), CODE.INVALID_ARGUMENT, "job id"),
        "unknown job": (lambda: client.get_job("nojob"), CODE.NOT_FOUND, "nojob"),
        "visualize an unfitted class": (lambda: list(client.visualize("tiny", 2, [0])), CODE.FAILED_PRECONDITION, "not fitted"),
        "evaluate outside the roots": (
            lambda: list(client.evaluate("tiny", str(tmp_path), str(data / "spurious"))), CODE.PERMISSION_DENIED, "clean",
        ),
    }
    for name, (call, code, fragment) in cases.items():
        got_code, message = _code(call)
        assert got_code == code, f"{name}: {got_code} {message}"
        assert fragment in message and "\n" not in message and "Traceback" not in message, f"{name}: {message}"


# ---- jobs: disconnect, cancel, resume ----


def test_a_fit_survives_its_client_going_away(client: Client, gated, data: Path) -> None:  # noqa: ANN001
    gate = gated[1].gate
    gate.clear()
    try:
        stream = client.fit("gated", str(data / "train"), classes=[0, 1], num_components=3, batch_size=2, job_id="survivor")
        assert isinstance(next(stream), FitProgress)
        stream.close()  # the client cancels its call
        time.sleep(0.3)
        assert client.get_job("survivor").state == "running"
    finally:
        gate.set()
    *_, summary = client.fit("gated", str(data / "train"), classes=[0, 1], num_components=3, batch_size=2,
                             job_id="survivor")  # the same request again re-attaches
    assert isinstance(summary, FitSummary) and summary.fit_id == "survivor"
    assert client.get_job("survivor").state == "succeeded"
    assert list(client.watch_job("survivor"))[-1] == summary  # a finished job answers at once
    assert client.get_model("gated").fit_id == "survivor"
    assert client.get_components("gated", 1).num_components == 3  # the store is consistent


def test_cancel_job_then_resume_with_the_same_id(client: Client, gated, data: Path) -> None:  # noqa: ANN001
    gate = gated[1].gate
    args = dict(classes=[0, 2], num_components=2, batch_size=2, job_id="stop-me")
    gate.clear()
    try:
        stream = client.fit("gated", str(data / "train"), **args)
        next(stream)
        assert client.cancel_job("stop-me").state in ("running", "cancelled")
    finally:
        gate.set()
    code, message = _code(lambda: list(stream))
    assert code == CODE.CANCELLED and "stop-me" in message
    job = client.get_job("stop-me")
    assert job.state == "cancelled" and job.error.code == "CANCELLED"
    assert "stop-me" in [j.job_id for j in client.list_jobs("gated")]
    *_, summary = client.fit("gated", str(data / "train"), **args)
    assert summary.fit_id == "stop-me" and [c.class_index for c in summary.classes] == [0, 2]
    assert client.cancel_job("stop-me").state == "succeeded"  # a finished job stays finished


# ---- metrics ----


def test_metrics_endpoint_exposes_the_named_series(server: BackgroundServer, client: Client, fitted) -> None:  # noqa: ANN001
    client.score("tiny", _images(9, 3))
    _code(lambda: client.get_model("nope"))
    text, samples = scrape_metrics(server.metrics_port)
    assert samples['spurguard_requests_total{code="OK",model="tiny",rpc="Score"}'] >= 1
    assert samples['spurguard_requests_total{code="NOT_FOUND",model="",rpc="GetModel"}'] >= 1
    assert samples['spurguard_request_duration_seconds_count{model="tiny",rpc="Score"}'] >= 1
    assert samples['spurguard_images_scored_total{model="tiny"}'] >= 3
    for series in ("spurguard_batch_size_count", "spurguard_queue_duration_seconds_count",
                   "spurguard_compute_duration_seconds_count"):
        assert samples[f'{series}{{model="tiny"}}'] >= 1
    assert "# TYPE spurguard_spurious_triggers_total counter" in text


# ---- the entry point ----


def test_bad_arguments_and_models_fail_fast(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["--model", "m", "--store", "s", "--max-message-mb", "16"])
    assert caught.value.code == 2 and "64" in capsys.readouterr().err
    store = ["--store", str(tmp_path / "store"), "--port", "0"]
    assert main(["--model", str(tmp_path / "missing"), *store]) == 2
    assert "neither a built-in model" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for part in model_dir.iterdir():
        (broken / part.name).write_bytes(part.read_bytes())
    (broken / "backbone.pt").write_bytes(b"not a torchscript archive")
    assert main(["--model", str(broken), *store]) == 1  # fails while loading, after the port opened
    err = capsys.readouterr().err
    assert "failed to load" in err and "backbone.pt" in err


DRAIN_DELAY_S, GRACE_S = 1.5, 10.0


class _Watch(threading.Thread):
    """A health Watch of one service name on its own channel: (monotonic time, status) of each
    message, until the server ends the stream (`ended`: its status code)."""

    def __init__(self, address: str, service: str) -> None:
        super().__init__(daemon=True)
        self.address, self.service = address, service
        self.seen: list[tuple[float, int]] = []
        self.ended: grpc.StatusCode | None = None

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=self.service))
            try:
                for reply in call:
                    self.seen.append((time.monotonic(), reply.status))
            except grpc.RpcError:
                pass
            self.ended = call.code()

    def first(self, status: int) -> float:
        return next(t for t, seen in self.seen if seen == status)


def _score_until_refused(address: str, image: bytes, calls: list[tuple[float, float, grpc.StatusCode]]) -> None:
    """Score one image after another until a call is refused: (start, end, code) of each."""
    request = pb.ScoreRequest(model="tiny", images=[pb.Image(id="x", encoded=image)])
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.SpurguardStub(channel)
        while True:
            started = time.monotonic()
            try:
                stub.Score(request, timeout=10)
                code = CODE.OK
            except grpc.RpcError as error:
                code = error.code()
            calls.append((started, time.monotonic(), code))
            if code != CODE.OK:
                return


def test_sigterm_drains_readiness_first_then_calls_then_exits_0(model_dir: Path, tmp_path: Path) -> None:
    """The drain timeline (SPEC §3), measured with health Watches and a client that keeps calling:
    readiness NOT_SERVING at once, liveness SERVING and calls answered for the drain delay, then
    new calls refused while an open ScoreStream still finishes, and the process exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--model", str(model_dir), "--store", str(tmp_path / "store"), "--device", "cpu",
            "--drain-delay-s", str(DRAIN_DELAY_S), "--grace-s", str(GRACE_S)]
    (_, image), = _images(11, 1)
    calls: list[tuple[float, float, grpc.StatusCode]] = []
    streamed: queue.Queue[pb.ScoreStreamRequest | None] = queue.Queue()
    with open(tmp_path / "server.log", "w") as log, ServerProcess(args, stderr=log.fileno(), env=env) as server:
        watches = {service: _Watch(server.target, service) for service in ("", "liveness")}
        for watch in watches.values():
            watch.start()
        with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(1) as pool:
            stream = pb_grpc.SpurguardStub(channel).ScoreStream(iter(streamed.get, None), timeout=60)
            streamed.put(pb.ScoreStreamRequest(request_id="before", model="tiny", image=pb.Image(id="a", encoded=image)))
            assert next(stream).request_id == "before"
            assert all(watch.seen[-1][1] == health_pb2.HealthCheckResponse.SERVING for watch in watches.values())
            looping = pool.submit(_score_until_refused, server.target, image, calls)
            time.sleep(0.3)
            signalled = time.monotonic()
            os.kill(server.process.pid, signal.SIGTERM)
            time.sleep(0.5)
            health = health_pb2_grpc.HealthStub(channel)
            statuses = [health.Check(health_pb2.HealthCheckRequest(service=s), timeout=5).status
                        for s in ("", "spurguard.v1.Spurguard", "tiny", "liveness")]
            assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING] * 3 + [health_pb2.HealthCheckResponse.SERVING]
            oip = oip_grpc.GRPCInferenceServiceStub(channel)
            assert oip.ServerLive(oip_pb.ServerLiveRequest(), timeout=5).live
            assert not oip.ServerReady(oip_pb.ServerReadyRequest(), timeout=5).ready
            looping.result(timeout=DRAIN_DELAY_S + 10)
            streamed.put(pb.ScoreStreamRequest(request_id="after", model="tiny", image=pb.Image(id="b", encoded=image)))
            after = next(stream)  # in flight when new calls were refused: it keeps being answered
            streamed.put(None)
            assert list(stream) == [] and stream.code() == CODE.OK
            closed = time.monotonic()
        assert server.process.wait(timeout=GRACE_S) == 0
        exited = time.monotonic()
    for watch in watches.values():
        watch.join(timeout=5)
    assert after.request_id == "after" and after.result.predictions and not after.result.HasField("error")

    ready, live = watches[""], watches["liveness"]
    assert ready.first(health_pb2.HealthCheckResponse.NOT_SERVING) - signalled < 0.5
    assert live.first(health_pb2.HealthCheckResponse.NOT_SERVING) - signalled >= DRAIN_DELAY_S * 0.95
    assert ready.ended == live.ended == CODE.OK  # the server ends Watch streams: they hold no drain up
    answered = [end for start, end, code in calls if code == CODE.OK and start > signalled]
    (first_refused, _, code), = [call for call in calls if call[2] != CODE.OK]
    assert code == CODE.UNAVAILABLE
    assert max(answered) - signalled >= DRAIN_DELAY_S * 0.8  # calls answered through the drain delay
    assert DRAIN_DELAY_S * 0.95 <= first_refused - signalled < DRAIN_DELAY_S + 1.0  # then refused
    assert exited - signalled < DRAIN_DELAY_S + GRACE_S and exited - closed < 3.0  # drained, not timed out
    assert "server stopped" in (tmp_path / "server.log").read_text()


def test_a_second_sigterm_ends_the_drain_delay(model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--model", str(model_dir), "--store", str(tmp_path / "store"), "--device", "cpu", "--drain-delay-s", "60"]
    with ServerProcess(args, env=env) as server, Client(server.target) as c:
        os.kill(server.process.pid, signal.SIGTERM)
        time.sleep(0.3)
        assert c.score("tiny", _images(12, 1))[0].error is None  # still answered, in the drain delay
        signalled = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0
        assert time.monotonic() - signalled < 5.0


def test_a_server_stopped_before_it_was_ready_has_no_drain_delay(tmp_path: Path) -> None:
    """No load balancer routes to a server that never was ready: nothing to wait for."""
    backend, module = _gated_backend()
    module.gate.clear()  # warm-up waits here

    async def stop_while_loading() -> float:
        server = SpurguardServer(ServerConfig(models=(), store=tmp_path, port=0, device="cpu", drain_delay_s=30),
                                 backends=[backend])
        await server.start()
        started = time.monotonic()
        try:
            await server.stop(0)
        finally:
            module.gate.set()
        return time.monotonic() - started

    assert asyncio.run(stop_while_loading()) < 5.0


def test_stop_cancels_running_jobs_and_leaves_a_resumable_fit(data: Path, tmp_path: Path) -> None:
    backend, module = _gated_backend()
    config = ServerConfig(models=(), store=tmp_path / "store", port=0, data_roots=(data,), device="cpu")
    args = dict(classes=[0, 1], num_components=2, batch_size=2, job_id="interrupted")
    running = BackgroundServer(config, backends=[backend]).start()
    module.gate.clear()
    try:
        with Client(running.address) as c:
            stream = c.fit("gated", str(data / "train"), **args)
            next(stream)
            stopping = threading.Thread(target=running.stop, kwargs={"grace": 10})
            stopping.start()
            time.sleep(0.3)
            module.gate.set()
            code, message = _code(lambda: list(stream))
            stopping.join(timeout=20)
    finally:
        module.gate.set()
        running.stop()
    assert code == CODE.CANCELLED and "interrupted" in message
    assert Store(tmp_path / "store").pending_fits("gated", backend.digest) == ["interrupted"]
    with BackgroundServer(config, backends=[backend]) as again, Client(again.address) as c:
        *_, summary = c.fit("gated", str(data / "train"), **args)
        assert summary.fit_id == "interrupted" and c.get_model("gated").fitted_classes == (0, 1)


# ---- bounded queues ----


def test_queue_flags_reach_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", "m", "--store", "s"]
    assert (ServerConfig.max_queued_jobs, ServerConfig.max_waiting_heavy_calls, ServerConfig.keep_unfinished_days) == (
        16, 8, 7.0)
    config = config_from_args(build_parser().parse_args(
        [*base, "--max-queued-jobs", "0", "--max-waiting-heavy-calls", "3", "--keep-unfinished-days", "0.5"]))
    assert (config.max_queued_jobs, config.max_waiting_heavy_calls, config.keep_unfinished_days) == (0, 3, 0.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--max-queued-jobs", "-1"])
    assert "must be >= 0, got -1" in capsys.readouterr().err


def test_fits_beyond_the_queue_limit_are_refused(data: Path, tmp_path: Path) -> None:
    backend, module = _gated_backend()
    config = ServerConfig(models=(), store=tmp_path / "store", port=0, data_roots=(data,), device="cpu",
                          max_queued_jobs=2)
    train, args = str(data / "train"), dict(classes=[0], num_components=2, batch_size=2)
    with BackgroundServer(config, backends=[backend]) as running, Client(running.address) as c:
        module.gate.clear()  # the first job holds the one worker
        try:
            streams = [c.fit("gated", train, job_id=f"q{i}", **args) for i in range(3)]
            for stream in streams:
                next(stream)  # submitted: one running, two queued
            code, message = _code(lambda: next(c.fit("gated", train, job_id="q3", **args)))
            assert code == CODE.RESOURCE_EXHAUSTED
            assert "2 jobs already wait" in message and "--max-queued-jobs" in message
            # the three calls raced to the registry: which one runs is not their order
            queued = [j.job_id for j in c.list_jobs() if j.state == "queued"]
            assert len(queued) == 2
            assert c.cancel_job(queued[0]).state == "cancelled"  # a place in the queue is free again
            streams.append(c.fit("gated", train, job_id="q3", **args))
        finally:
            module.gate.set()
        kept = [s for i, s in enumerate(streams) if f"q{i}" != queued[0]]
        assert sorted(list(s)[-1].fit_id for s in kept) == sorted({"q0", "q1", "q2", "q3"} - {queued[0]})


def test_heavy_calls_beyond_the_waiting_limit_are_refused(data: Path, tmp_path: Path) -> None:
    backend, module = _gated_backend()
    config = ServerConfig(models=(), store=tmp_path / "store", port=0, data_roots=(data,), device="cpu",
                          max_heavy_calls=1, max_waiting_heavy_calls=1)
    spurious, visualize = str(data / "spurious"), dict(steps=2, top_k=1, heatmap="none")
    with BackgroundServer(config, backends=[backend]) as running, Client(running.address) as c, \
            ThreadPoolExecutor(1) as pool:
        list(c.fit("gated", str(data / "train"), classes=[0], num_components=2))
        module.gate.clear()
        try:
            computing = pool.submit(lambda: list(c.visualize("gated", 0, [0], **visualize)))
            deadline = time.monotonic() + 20
            while module.waiting == 0 and time.monotonic() < deadline:  # it holds the one slot, at the gate
                time.sleep(0.05)
            waiting = c.evaluate("gated", str(data / "train"), spurious)
            assert next(waiting).phase == "queued"
            time.sleep(0.3)  # it takes its place in the queue right after saying so
            for rpc, call in {"Visualize": lambda: list(c.visualize("gated", 0, [0], **visualize)),
                              "Evaluate": lambda: list(c.evaluate("gated", str(data / "train"), spurious))}.items():
                started = time.monotonic()
                code, message = _code(call)
                assert code == CODE.RESOURCE_EXHAUSTED and time.monotonic() - started < 5  # at once, no hang
                assert f"{rpc}: all 1 heavy-call slots" in message and "1 Visualize/Evaluate calls already wait" in message
                assert "--max-waiting-heavy-calls" in message
        finally:
            module.gate.set()
        assert computing.result(timeout=30)[-1].final_alpha is not None
        assert isinstance(list(waiting)[-1], EvaluateResult)


# ---- jobs across restarts ----


def test_a_restarted_server_still_reports_every_job(data: Path, tmp_path: Path) -> None:
    backend, module = _gated_backend()
    config = ServerConfig(models=(), store=tmp_path / "store", port=0, data_roots=(data,), device="cpu")
    train, args = str(data / "train"), dict(classes=[0], num_components=2, batch_size=2)
    with BackgroundServer(config, backends=[backend]) as first, Client(first.address) as c:
        *_, summary = c.fit("gated", train, job_id="kept", **args)
        module.gate.clear()
        try:
            stream = c.fit("gated", train, job_id="stopped", **args)
            next(stream)
            c.cancel_job("stopped")
        finally:
            module.gate.set()
        assert _code(lambda: list(stream))[0] == CODE.CANCELLED
    with BackgroundServer(config, backends=[backend]) as again, Client(again.address) as c:
        job = c.get_job("kept")
        assert job.state == "succeeded" and job.summary == summary and job.request.classes == (0,)
        assert list(c.watch_job("kept"))[-1] == summary
        stopped = c.get_job("stopped")
        assert stopped.state == "cancelled" and stopped.error.code == "CANCELLED"
        assert [j.job_id for j in c.list_jobs("gated")] == ["stopped", "kept"]
        assert c.cancel_job("kept").state == "succeeded"
        calls = module.calls
        assert list(c.fit("gated", train, job_id="kept", **args))[-1] == summary  # re-attached, not refitted
        assert module.calls == calls
        assert _code(lambda: list(c.fit("gated", train, job_id="kept", classes=[1])))[0] == CODE.FAILED_PRECONDITION
        *_, resumed = c.fit("gated", train, job_id="stopped", **args)
        assert resumed.fit_id == "stopped" and c.get_job("stopped").state == "succeeded"
        assert _code(lambda: c.get_job("never"))[0] == CODE.NOT_FOUND


# ---- kill -9 ----


def _leftovers(store: Path) -> list[str]:
    return [str(p.relative_to(store)) for p in store.rglob("*") if p.name.endswith(".tmp") or p.name == ".scratch"]


def test_kill_9_at_random_points_of_a_fit_then_restart_and_resume(model_dir: Path, data: Path, tmp_path: Path) -> None:
    """Rounds of: a server is SIGKILLed at a seeded random crash point of a fit (mid-features,
    after a class, before the manifest, between the manifest and current.json); the next server
    on the same store must report that job interrupted, keep every label and fit, have cleared
    the leftovers, and resume the fit with its job id to success."""
    rng = random.Random(1109)
    store, tmp = tmp_path / "store", tmp_path / "tmp"
    tmp.mkdir()
    train, args = str(data / "train"), dict(classes=[0, 1, 2], num_components=2, batch_size=2)  # 15 batches
    labels: dict[tuple[str, int, int], str] = {}  # (fit, class, component) -> label: must survive every kill
    previous: str | None = None  # the job the last server died in
    current = "base"
    for round_, kind in enumerate([*rng.sample(["batch", "class", "commit-manifest", "commit-current"], 4), None]):
        job = f"round{round_}"
        crash = {"batch": f"batch:{job}:{rng.randint(1, 14)}", "class": f"class:{job}:{rng.randint(0, 2)}"}.get(
            kind or "", f"{kind}:{job}")
        env = {"TMPDIR": str(tmp), **({CRASH_ENV: crash} if kind else {})}
        log = tmp_path / f"server-{round_}.log"
        with log.open("w") as output:
            server = ServerProcess(["--model", str(model_dir), "--store", str(store), "--device", "cpu",
                                    "--data-root", str(data)], stderr=output.fileno(),
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env})
        process = server.process
        try:
            with Client(server.target, timeout=30) as c:
                if previous is None:
                    list(c.fit("tiny", train, job_id="base", **args))
                else:
                    job_record = c.get_job(previous)
                    assert job_record.state == "failed" and job_record.error.code == "ABORTED", job_record
                    assert _leftovers(store) == [] and list(tmp.glob("spurguard*")) == []  # scratch stays in the store
                    assert c.get_model("tiny").fit_id == current  # the fit in use before the kill
                    for (fit_id, k, component), label in labels.items():
                        assert (component, label) in {(r.component, r.label) for r in c.list_labels(
                            "tiny", class_index=k, fit_id=fit_id)}
                    *_, summary = c.fit("tiny", train, job_id=previous, **args)
                    assert summary.fit_id == previous and [x.class_index for x in summary.classes] == [0, 1, 2]
                    assert c.get_job(previous).state == "succeeded" and c.get_model("tiny").fit_id == previous
                    assert all(c.get_components("tiny", k).num_components == 2 for k in range(3))
                    current = previous
                k, component = rng.randint(0, 2), rng.randint(0, 1)
                c.label("tiny", k, component, "spurious")
                labels[(current, k, component)] = "spurious"
                if kind is None:
                    break
                with pytest.raises(SpurguardClientError):
                    list(c.fit("tiny", train, job_id=job, **args))
            assert process.wait(timeout=20) == -signal.SIGKILL, (crash, log.read_text())
            previous = job
        finally:
            server.stop()
    assert len(labels) >= 2 and current == "round3"


def test_a_replica_sharing_the_store_reports_and_follows_the_others_job(data: Path, tmp_path: Path) -> None:
    (backend, module), (other, _) = _gated_backend(), _gated_backend()
    config = ServerConfig(models=(), store=tmp_path / "store", port=0, data_roots=(data,), device="cpu")
    train, args = str(data / "train"), dict(classes=[0], num_components=2, batch_size=2, job_id="shared")
    with BackgroundServer(config, backends=[backend]) as runs, BackgroundServer(config, backends=[other]) as replica, \
            Client(runs.address) as a, Client(replica.address) as b:
        module.gate.clear()
        try:
            stream = a.fit("gated", train, **args)
            next(stream)
            assert b.get_job("shared").state in ("queued", "running")  # its server is alive: not interrupted
            code, message = _code(lambda: b.cancel_job("shared"))
            assert code == CODE.FAILED_PRECONDITION and "another server" in message
            following = b.fit("gated", train, **args)  # the same request re-attaches to it there
        finally:
            module.gate.set()
        summary = list(stream)[-1]
        assert list(following)[-1] == summary and list(b.watch_job("shared"))[-1] == summary


# ---- labels across refits (SPEC §1 Labels) ----


def test_a_refit_carries_labels_to_matching_components_and_lists_the_rest(model_dir: Path, tmp_path: Path) -> None:
    """A refit on the same images carries every label to the same component (|cos| 1); a refit on
    other images carries exactly the labels whose eigenvector has a match >= 0.95 (checked here
    from the two fits' vectors) and lists the others in the summary, with the old fit keeping them."""
    first, other = write_data_root(tmp_path / "a", CLASSES, PER_CLASS, 0), tmp_path / "b"
    write_data_root(other, CLASSES, PER_CLASS, 0, seed=5)
    store = tmp_path / "store"
    config = ServerConfig(models=(str(model_dir),), store=store, port=0, data_roots=(first, other), device="cpu")
    args = dict(classes=[0, 1], num_components=COMPONENTS)
    with BackgroundServer(config) as running, Client(running.address, timeout=30) as c:
        *_, base = c.fit("tiny", str(first / "train"), **args)
        assert base.labels_from_fit == "" and base.labels_carried == () == base.labels_not_carried
        given = {(0, 0): "spurious", (0, 1): "not_spurious", (1, 2): "inconsistent"}
        for (k, component), label in given.items():
            c.label("tiny", k, component, label, note="seen by a person")
        *_, same = c.fit("tiny", str(first / "train"), **args)
        assert same.labels_from_fit == base.fit_id and same.labels_not_carried == ()
        assert {(x.class_index, x.from_component, x.to_component, x.label) for x in same.labels_carried} == {
            (k, component, component, label) for (k, component), label in given.items()}
        assert all(x.cos > 0.999 for x in same.labels_carried)
        notes = {(r.class_index, r.component): r.note for r in c.list_labels("tiny", fit_id=same.fit_id)}
        assert set(notes.values()) == {"seen by a person"}  # identical components: the labels as they were

        *_, moved = c.fit("tiny", str(other / "train"), **args)
    fits, digest = Store(store), moved.digest
    old, new = fits.load_fit("tiny", digest, same.fit_id), fits.load_fit("tiny", digest, moved.fit_id)
    expected_carried, expected_lost = set(), set()
    for (k, component), label in given.items():
        cos = np.abs(old.components(k).vectors[component] @ new.components(k).vectors.T)
        (expected_carried if cos.max() >= 0.95 else expected_lost).add((k, component, label, int(cos.argmax())))
    assert expected_carried and expected_lost  # the seeds give both cases
    assert moved.labels_from_fit == same.fit_id
    assert {(x.class_index, x.from_component, x.label, x.to_component) for x in moved.labels_carried} == expected_carried
    assert {(x.class_index, x.component, x.label) for x in moved.labels_not_carried} == {
        (k, component, label) for k, component, label, _ in expected_lost}
    assert all(x.best_cos < 0.95 and "no component of the new fit matches it" in x.reason
               for x in moved.labels_not_carried)
    on_new = {(r.class_index, r.component, r.label) for r in fits.list_labels("tiny", digest, fit_id=moved.fit_id)
              if r.updated is not None}
    assert on_new == {(k, to, label) for k, _, label, to in expected_carried}
    assert all(r.note.startswith(f"carried from fit {same.fit_id} component ") and r.note.endswith("; seen by a person")
               for r in fits.list_labels("tiny", digest, fit_id=moved.fit_id) if r.updated is not None)
    assert len(fits.labels.query("tiny", digest, same.fit_id)) == len(given)  # the old fit keeps every label
