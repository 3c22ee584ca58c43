"""Visualize over gRPC: top fit images, heatmaps, attack frames and results of a planted feature.

One in-process server for the module serves three versions of the planted CNN (see
tests/visualize/visualize_support.py), each fitted on a generated folder where some images of
class 0 carry the planted red square: `planted`, a TorchScript model directory (heatmaps fall
back to input gradients); `eager`, the plain nn.Module whose forward can be held at a gate
(Grad-CAM, cancellation); `forward_only`, the same model without gradients (like Triton).
"""
from __future__ import annotations

import io
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from spurguard.client import AttackFrame, AttackResult, Client, Heatmap, SpurguardClientError, TopImage
from spurguard.server.backends import TorchBackend
from spurguard.server.rpc.app import BackgroundServer, ServerConfig
from spurguard.server.serving.options import MAX_COMPONENTS, MAX_STEPS
from spurguard.server.visualize import default_eps
from spurguard.server.visualize.heatmap import default_gradcam_layer
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc
from rpc_support import Gated, one_thread_server, scrape_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "visualize"))
from visualize_support import SIZE, PlantedCNN, make_backend, write_dataset, write_model_dir  # noqa: E402

PER_CLASS = 8
PATCHED = 4
COMPONENTS = 4
STEPS = 20
FRAME_EVERY = 5
CODE = grpc.StatusCode
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


class GatedPlanted(Gated, PlantedCNN):
    """The planted CNN whose forward waits while `gate` is clear, counting its calls."""


class ForwardOnly:
    """A backend without features_with_grad (as a Triton backend is): Visualize must refuse it."""

    kind = "triton"

    def __init__(self, inner: TorchBackend) -> None:
        self._inner = inner
        self.name = "forward_only"
        self.digest = "2" * 64

    def __getattr__(self, name: str) -> Any:
        if name in ("features_with_grad", "module"):
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("visualize")


@pytest.fixture(scope="module")
def patched_ids(root: Path) -> list[str]:
    return write_dataset(root / "data" / "train", per_class=PER_CLASS, patched=PATCHED)


@pytest.fixture(scope="module")
def gated_module() -> GatedPlanted:
    return GatedPlanted().eval()


@pytest.fixture(scope="module")
def server(root: Path, patched_ids: list[str], gated_module: GatedPlanted) -> Iterator[BackgroundServer]:
    config = ServerConfig(
        models=(str(write_model_dir(root / "model")),),
        store=root / "store",
        port=0,
        metrics_port=0,
        data_roots=(root / "data",),
        device="cpu",
        grace_s=2.0,
    )
    backends = [make_backend(gated_module, "eager", "1" * 64), ForwardOnly(make_backend(PlantedCNN(), "plain"))]
    with one_thread_server(config, backends) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        for model, classes in (("planted", [0, 1]), ("eager", [0]), ("forward_only", [0])):
            *_, summary = c.fit(model, "train", classes=classes, num_components=COMPONENTS)
            assert [k.class_index for k in summary.classes] == classes
        yield c


def _by_kind(updates: list[Any], component: int) -> dict[type, list[Any]]:
    kinds: dict[type, list[Any]] = {TopImage: [], Heatmap: [], AttackFrame: [], AttackResult: []}
    for update in updates:
        if update.component == component:
            kinds[type(update)].append(update)
    return kinds


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SpurguardClientError) as caught:
        call()
    return caught.value.code, caught.value.details


# ---- the stream ----


def test_top_images_heatmaps_frames_and_the_attack_of_the_planted_component(
    client: Client, root: Path, patched_ids: list[str]
) -> None:
    updates = list(client.visualize("planted", 0, [0], steps=STEPS, frame_every=FRAME_EVERY, top_k=6))
    kinds = _by_kind(updates, 0)
    order = [type(u) for u in updates]
    assert order == [TopImage] * 6 + [Heatmap] * 6 + [AttackFrame] * (STEPS // FRAME_EVERY + 1) + [AttackResult]

    tops = kinds[TopImage]
    alphas = [top.alpha for top in tops]
    assert [top.rank for top in tops] == list(range(6)) and alphas == sorted(alphas, reverse=True)
    assert {top.image_id for top in tops[:PATCHED]} == set(patched_ids)  # the planted feature leads
    assert min(alphas[:PATCHED]) > 10 * max(alphas[PATCHED:])
    stats = client.get_components("planted", 0, top=1).components[0]
    assert alphas[0] == pytest.approx(stats.alpha_max, rel=1e-6)
    for top in tops:  # the model's view of the file: size == resize, so the image itself
        assert top.path == str((root / "data" / "train" / top.image_id).resolve())  # the file the server read
        original = np.asarray(Image.open(top.path).convert("RGB"))
        assert np.abs(_pixels(top.png).astype(int) - original).max() <= 1

    heatmaps = kinds[Heatmap]
    assert [(h.rank, h.image_id, h.path, h.alpha) for h in heatmaps] == [(t.rank, t.image_id, t.path, t.alpha) for t in tops]
    assert {h.method for h in heatmaps} == {"integrated_gradients"}  # TorchScript: no layer to hook
    assert all(_pixels(h.png).shape == (SIZE, SIZE, 3) for h in heatmaps)

    frames, (result,) = kinds[AttackFrame], kinds[AttackResult]
    assert [f.step for f in frames] == list(range(0, STEPS + 1, FRAME_EVERY))
    assert frames[0].alpha == pytest.approx(result.start_alpha)
    assert np.all(_pixels(frames[0].png) == 128)  # the gray start
    assert result.steps == STEPS and result.final_alpha >= max(f.alpha for f in frames) - 1e-6
    assert result.eps == pytest.approx(default_eps(SIZE))  # the radius it ran with: the default here
    assert result.parameterization == "pixel"  # and the parameterisation: the default here
    assert result.final_alpha - result.start_alpha > 2 * stats.alpha_max  # far beyond any fit image
    assert 0.0 < result.final_prob < 1.0 and _pixels(result.png).shape == (SIZE, SIZE, 3)


def test_several_components_are_one_attack_batch(client: Client) -> None:
    updates = list(client.visualize("planted", 0, [2, 0, 1], steps=4, frame_every=2, top_k=2, heatmap="none"))
    assert not any(isinstance(u, Heatmap) for u in updates)
    frames = [(u.step, u.component) for u in updates if isinstance(u, AttackFrame)]
    assert frames == [(step, c) for step in (0, 2, 4) for c in (2, 0, 1)]  # each step: every component
    assert [u.component for u in updates if isinstance(u, AttackResult)] == [2, 0, 1]
    assert all(type(updates[i]) is AttackResult for i in range(-3, 0))
    tops = [u.component for u in updates if isinstance(u, TopImage)]
    assert tops == [2, 2, 0, 0, 1, 1]


def test_the_same_seed_gives_the_same_stream_and_pngs_carry_their_size(server: BackgroundServer, client: Client) -> None:
    request = pb.VisualizeRequest(model="planted", class_index=0, components=[0, 3], steps=6, frame_every=3, top_k=2,
                                  seed=7)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.SpurguardStub(channel)
        first, second = (list(stub.Visualize(request, timeout=30)) for _ in range(2))
    assert [m.SerializeToString(deterministic=True) for m in first] == [
        m.SerializeToString(deterministic=True) for m in second
    ]
    pngs = [getattr(m, m.WhichOneof("update")).png for m in first]
    assert len(pngs) == 2 * (2 + 2 + 3 + 1) and {(p.width, p.height) for p in pngs} == {(SIZE, SIZE)}


def test_grad_cam_on_a_plain_module_and_the_requested_method(client: Client) -> None:
    requested = (None, "grad_cam", "integrated_gradients", "input_gradient")
    for method, want in zip(requested, ("grad_cam", "grad_cam", "integrated_gradients", "input_gradient")):
        heatmaps = [u for u in client.visualize("eager", 0, [0], steps=1, top_k=2, heatmap=method)
                    if isinstance(u, Heatmap)]
        assert [h.method for h in heatmaps] == [want, want], method


def test_grad_cam_on_a_named_layer(client: Client) -> None:
    def heatmap_pngs(layer: str | None) -> list[bytes]:
        updates = client.visualize("eager", 0, [0], steps=1, top_k=2, heatmap_layer=layer)
        heatmaps = [u for u in updates if isinstance(u, Heatmap)]
        assert {h.method for h in heatmaps} == {"grad_cam"}
        return [h.png for h in heatmaps]

    default, named_default, finer = heatmap_pngs(None), heatmap_pngs("down"), heatmap_pngs("act")
    assert default == named_default  # "down" is the default layer
    assert finer != default  # the 32x32 map before pooling draws other maps than the 16x16 one


def test_the_default_grad_cam_layer() -> None:
    assert default_gradcam_layer(make_backend(PlantedCNN())) == "down"  # the last spatial map (16x16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(PlantedCNN().eval(), torch.zeros(1, 3, SIZE, SIZE))
    assert default_gradcam_layer(make_backend(traced)) is None  # TorchScript: input gradients
    assert default_gradcam_layer(ForwardOnly(make_backend(PlantedCNN()))) is None


def test_a_vanished_fit_image_is_skipped_with_a_log_line(
    client: Client, root: Path, patched_ids: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    top = next(u for u in client.visualize("planted", 0, [0], steps=1, top_k=1) if isinstance(u, TopImage))
    path = root / "data" / "train" / top.image_id
    hidden = path.with_name(path.name + ".hidden")
    path.rename(hidden)
    try:
        with caplog.at_level(logging.WARNING, logger="spurguard.server"):
            updates = list(client.visualize("planted", 0, [0], steps=2, top_k=3))
    finally:
        hidden.rename(path)
    assert [u.rank for u in updates if isinstance(u, TopImage)] == [1, 2]
    assert [u.rank for u in updates if isinstance(u, Heatmap)] == [1, 2]
    assert isinstance(updates[-1], AttackResult)
    assert f"skipping fit image {top.image_id!r}" in caplog.text


# ---- errors ----


def test_errors_have_their_status_before_any_message(server: BackgroundServer, client: Client) -> None:
    def first(model: str = "planted", class_index: int = 0, components: tuple[int, ...] = (0,), **kwargs: Any) -> Any:
        return lambda: next(client.visualize(model, class_index, list(components), **kwargs))

    cases = {
        "unknown model": (first("nope"), CODE.NOT_FOUND, "nope"),
        "class out of range": (first(class_index=3), CODE.NOT_FOUND, "0..2"),
        "unfitted class": (first(class_index=2), CODE.FAILED_PRECONDITION, "not fitted"),
        "unknown component": (first(components=(0, 9)), CODE.NOT_FOUND, "no component 9"),
        "unknown fit": (first(fit_id="nofit"), CODE.NOT_FOUND, "nofit"),
        "no component": (first(components=()), CODE.INVALID_ARGUMENT, "no components"),
        "too many components": (
            first(components=tuple(range(MAX_COMPONENTS + 1))), CODE.INVALID_ARGUMENT, f"limit of {MAX_COMPONENTS}",
        ),
        "repeated component": (first(components=(1, 0, 1)), CODE.INVALID_ARGUMENT, "component 1 is given more"),
        "zero steps": (first(steps=0), CODE.INVALID_ARGUMENT, "steps"),
        "too many steps": (first(steps=MAX_STEPS + 1), CODE.INVALID_ARGUMENT, str(MAX_STEPS)),
        "negative eps": (first(eps=-1.0), CODE.INVALID_ARGUMENT, "eps"),
        "nan eps": (first(eps=float("nan")), CODE.INVALID_ARGUMENT, "eps"),
        "eps that overflows": (first(eps=1e308), CODE.INVALID_ARGUMENT, "and 27.71 (from gray to a corner"),
        "eps beyond the box": (first(eps=27.72), CODE.INVALID_ARGUMENT, "32x32 input; a larger radius bounds nothing"),
        "eps that underflows": (first(eps=1e-300), CODE.INVALID_ARGUMENT, "between 0.004 (one grey level)"),
        "zero top_k": (first(top_k=0), CODE.INVALID_ARGUMENT, "top_k"),
        "too many frames": (first(steps=MAX_STEPS, frame_every=1), CODE.INVALID_ARGUMENT, "frame_every >= 6"),
        "no gradients": (first("forward_only"), CODE.FAILED_PRECONDITION, "need a local torch backend with gradients"),
        "layer of a TorchScript backbone": (first(heatmap_layer="act"), CODE.FAILED_PRECONDITION, "cannot be hooked"),
        "unknown layer": (first("eager", heatmap_layer="body"), CODE.INVALID_ARGUMENT, "no layer 'body'; its layers"),
        "layer for another method": (
            first("eager", heatmap="input_gradient", heatmap_layer="act"), CODE.INVALID_ARGUMENT, "for grad_cam",
        ),
    }
    for name, (call, code, fragment) in cases.items():
        got, message = _code(call)
        assert got == code, f"{name}: {got} {message}"
        assert fragment in message and "\n" not in message and "Traceback" not in message, f"{name}: {message}"
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.SpurguardStub(channel).Visualize(
                pb.VisualizeRequest(model="planted", class_index=0, components=[0], heatmap=9), timeout=10))
    assert caught.value.code() == CODE.INVALID_ARGUMENT and "heatmap" in caught.value.details()
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(pb_grpc.SpurguardStub(channel).Visualize(
                pb.VisualizeRequest(model="planted", class_index=0, components=[0], parameterization=9), timeout=10))
    assert caught.value.code() == CODE.INVALID_ARGUMENT and "parameterization" in caught.value.details()


@pytest.mark.parametrize("parameterization", ["low_frequency", "jitter"])
def test_the_result_names_the_parameterization_asked_for(client: Client, parameterization: str) -> None:
    *_, result = client.visualize("planted", 0, [0], steps=3, top_k=1, heatmap="none", parameterization=parameterization)
    assert isinstance(result, AttackResult) and result.parameterization == parameterization
    assert result.final_alpha > result.start_alpha


def test_request_values_at_their_limits_run(client: Client) -> None:
    """The largest eps quoted in the error, the largest uint64 seed and uint32 frame_every are
    accepted: a request value must never end in INTERNAL."""
    *_, result = client.visualize("planted", 0, [0], steps=2, eps=27.71, seed=2**64 - 1, frame_every=2**32 - 1,
                                  top_k=1, heatmap="none")
    assert isinstance(result, AttackResult) and result.steps == 2
    *_, smallest = client.visualize("planted", 0, [0], steps=1, eps=0.004, top_k=1, heatmap="none")
    assert isinstance(smallest, AttackResult)


# ---- cancellation ----


def test_a_client_going_away_cancels_the_attack_and_the_server_serves_on(
    client: Client, gated_module: GatedPlanted, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spurguard.server")
    stream = client.visualize("eager", 0, [0], steps=3000, frame_every=10, top_k=1, heatmap="none")
    try:
        assert isinstance(next(stream), TopImage)
        assert isinstance(next(stream), AttackFrame)  # the attack runs
        gated_module.gate.clear()  # hold it at its next forward pass
        stream.close()  # the client cancels its call
        time.sleep(0.3)
        calls = gated_module.calls
    finally:
        gated_module.gate.set()
    time.sleep(0.5)
    assert gated_module.calls - calls <= 2  # about 3000 more without the cancel
    assert "attack cancelled" in caplog.text
    *_, result = client.visualize("eager", 0, [0], steps=3, top_k=1)
    assert isinstance(result, AttackResult) and result.steps == 3


def test_metrics_count_attack_steps(server: BackgroundServer, client: Client) -> None:
    list(client.visualize("planted", 1, [0], steps=5, top_k=1))
    _, samples = scrape_metrics(server.metrics_port)
    assert samples['spurguard_attack_steps_total{model="planted"}'] >= 5
    assert samples['spurguard_attack_duration_seconds_count{model="planted"}'] >= 1
    assert samples['spurguard_requests_total{code="OK",model="planted",rpc="Visualize"}'] >= 1
