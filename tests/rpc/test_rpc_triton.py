"""A model.toml [triton] model against a real Triton Inference Server (PyTriton, triton_server.py).

One server serves the same TinyCNN twice: `remote`, whose forward runs on Triton, and `local`,
in process. Fit, Score and Evaluate of the two must agree; Triton going away must cost only the
remote model's requests, and Triton coming back (same port) must make them work again.
The Triton venv (.venv-triton) is made by `make test` (so by .ci/run), or here when missing.
"""
from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import tritonclient.grpc
import numpy as np
import pytest
import safetensors.torch
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spurguard.client import Client, EvaluateResult, FitSummary, SpurguardClientError
from spurguard.server.backends import load_model_dir
from spurguard.server.backends.modeldir import TritonSpec
from spurguard.server.backends.onnx_export import export_onnx
from spurguard.server.backends.triton_forward import TritonForward
from spurguard.server.errors import InvalidInput, NotFound, Unavailable
from spurguard.server.rpc.app import BackgroundServer, ServerConfig

from pki_support import make_pki
from rpc_support import random_png, write_data_root
from triton_support import TritonProcess, ensure_triton_venv, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from backends_support import CLASSES, FEATURES, SIZE, TinyCNN, default_toml, render_toml  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")  # TorchScript dirs
TRITON_MODEL = "tiny_backbone"
PER_CLASS = 8


def _model_dir(root: Path, name: str, module: TinyCNN, head: tuple[torch.Tensor, torch.Tensor], **toml: object) -> Path:
    root.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in torch 2.13, still supported
        torch.jit.trace(module, torch.randn(2, 3, SIZE, SIZE)).save(str(root / "backbone.pt"))
    safetensors.torch.save_file({"weight": head[0], "bias": head[1]}, str(root / "head.safetensors"))
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(CLASSES)))
    table = {**default_toml(), "name": name, "runtime": "torch", **toml}
    if "preprocess" in toml:
        table["preprocess"] = {**default_toml()["preprocess"], **toml["preprocess"]}  # type: ignore[dict-item]
    (root / "model.toml").write_text(render_toml(table))
    return root


@pytest.fixture(scope="module")
def module() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="module")
def head() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(CLASSES, FEATURES, generator=generator), torch.randn(CLASSES, generator=generator)


@pytest.fixture(scope="module")
def graph(module: TinyCNN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backbone's ONNX graph, which the Triton servers run (needs the PyTriton venv)."""
    missing = ensure_triton_venv()
    if missing is not None:
        pytest.skip(missing)
    path = tmp_path_factory.mktemp("graph") / "backbone.onnx"
    export_onnx(module, path, SIZE)
    return path


def _running(process: TritonProcess) -> Iterator[TritonProcess]:
    try:
        process.start()
    except RuntimeError as error:
        pytest.fail(str(error))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def triton(graph: Path) -> Iterator[TritonProcess]:
    yield from _running(TritonProcess(graph, TRITON_MODEL))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_triton(graph: Path, pki: Path) -> Iterator[TritonProcess]:
    """A second Triton whose gRPC port speaks mutual TLS only."""
    yield from _running(TritonProcess(graph, TRITON_MODEL, pki=pki))


@pytest.fixture(scope="module")
def models(
    module: TinyCNN, head: tuple[torch.Tensor, torch.Tensor], triton: TritonProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    section = {"triton": {"url": triton.url, "model": TRITON_MODEL}}
    return {
        "remote": _model_dir(root / "remote", "remote", module, head, **section),
        "local": _model_dir(root / "local", "local", module, head),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/ and a Spurious ImageNet folder for class 0."""
    return write_data_root(tmp_path_factory.mktemp("data"), CLASSES, PER_CLASS, spurious=4)


@pytest.fixture(scope="module")
def client(models: dict[str, Path], data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    config = ServerConfig(models=(str(models["remote"]), str(models["local"])), store=tmp_path_factory.mktemp("store"),
                          port=0, data_roots=(data,), device="cpu", runtime="torch", grace_s=1.0)
    with BackgroundServer(config) as server, Client(server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(2)
    return [random_png(rng, size=24) for _ in range(6)]


def _alphas(client: Client, model: str, images: list[bytes]) -> np.ndarray:
    results = client.score(model, images)
    assert all(r.error is None for r in results), [r.error for r in results]
    return np.array([[c.alpha for c in sorted(r.components, key=lambda c: c.index)] for r in results])


def _score_error(client: Client, model: str, images: list[bytes]) -> str:
    """The status code a failing Score gets: on the call, or on every image."""
    try:
        results = client.score(model, images)
    except SpurguardClientError as error:
        return error.code.name
    codes = {r.error.code if r.error else "OK" for r in results}
    assert len(codes) == 1, codes
    return codes.pop()


def test_fit_score_and_evaluate_on_triton_equal_the_local_model(client: Client, data: Path, images: list[bytes]) -> None:
    for model in ("remote", "local"):
        *_, summary = client.fit(model, str(data / "train"), num_components=3)
        assert isinstance(summary, FitSummary) and len(summary.classes) == CLASSES
    remote, local = _alphas(client, "remote", images), _alphas(client, "local", images)
    assert remote.shape == local.shape and remote.size > 0
    np.testing.assert_allclose(remote, local, rtol=1e-4, atol=1e-4 * np.abs(local).max())
    tables = [list(client.evaluate(m, str(data / "train"), str(data / "spurious")))[-1] for m in ("remote", "local")]
    assert all(isinstance(t, EvaluateResult) for t in tables)
    (remote_table, local_table) = (t.baseline for t in tables)  # type: ignore[union-attr]
    assert remote_table.mean_auc == pytest.approx(local_table.mean_auc, rel=1e-4)
    assert remote_table.clean_accuracy == pytest.approx(local_table.clean_accuracy, rel=1e-4)


def test_get_model_reports_triton(client: Client, triton: TritonProcess) -> None:
    info = client.get_model("remote")
    assert (info.runtime, info.device, info.feature_dim, info.input_size) == ("triton", triton.url, FEATURES, SIZE)
    assert info.supports_gradients  # Visualize runs on the local backbone, same weights
    assert client.get_model("local").runtime == "torch"


def test_triton_going_away_costs_only_its_model_and_it_comes_back(
    client: Client, triton: TritonProcess, images: list[bytes]
) -> None:
    client.score("remote", images[:2])
    assert _health(client, "remote") == health_pb2.HealthCheckResponse.SERVING
    triton.stop()
    try:
        assert _score_error(client, "remote", images) == "UNAVAILABLE"
        assert _score_error(client, "local", images) == "OK"
        assert _health_becomes(client, "remote", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _health(client, "local") == health_pb2.HealthCheckResponse.SERVING
        with tritonclient.grpc.InferenceServerClient(client.target) as oip:  # the OIP says the same
            assert not oip.is_model_ready("remote") and oip.is_model_ready("local")
    finally:
        triton.start()
    assert _health_becomes(client, "remote", health_pb2.HealthCheckResponse.SERVING)  # by itself
    # gRPC reconnects within its capped backoff (1 s, triton_forward._CHANNEL_ARGS)
    time.sleep(1.2)
    assert _alphas(client, "remote", images).shape == _alphas(client, "local", images).shape


def _health(client: Client, service: str) -> int:
    with grpc.insecure_channel(client.target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def _health_becomes(client: Client, service: str, status: int, timeout_s: float = 10.0) -> bool:
    """Whether the model's health status turns `status` within `timeout_s` (it is polled each second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _health(client, service) == status:
            return True
        time.sleep(0.2)
    return False


# ---- load errors ----


def test_a_mismatching_input_size_is_a_clear_error(
    module: TinyCNN, head: tuple[torch.Tensor, torch.Tensor], triton: TritonProcess, tmp_path: Path
) -> None:
    section = {"triton": {"url": triton.url, "model": TRITON_MODEL}}
    backend = load_model_dir(_model_dir(tmp_path / "m", "m", module, head, preprocess={"size": SIZE + 2}, **section))
    with pytest.raises(InvalidInput, match=rf"input 'images' is \[-1, 3, {SIZE}, {SIZE}\], but preprocess.size"):
        backend.select_runtime(None, lambda: pytest.fail("no ONNX export for a Triton model"))


def test_a_mismatching_feature_dim_is_a_clear_error(triton: TritonProcess) -> None:
    with pytest.raises(InvalidInput, match=rf"output 'features' is \[-1, {FEATURES}\], but the head's d"):
        TritonForward(TritonSpec(triton.url, TRITON_MODEL), input_size=SIZE, feature_dim=FEATURES + 1)


def test_other_weights_on_triton_are_a_clear_error(
    head: tuple[torch.Tensor, torch.Tensor], triton: TritonProcess, tmp_path: Path
) -> None:
    torch.manual_seed(7)
    section = {"triton": {"url": triton.url, "model": TRITON_MODEL}}
    backend = load_model_dir(_model_dir(tmp_path / "m", "m", TinyCNN().eval(), head, **section))
    with pytest.raises(InvalidInput, match="runtime triton gives features .* away from torch's"):
        backend.select_runtime(None, lambda: pytest.fail("no ONNX export for a Triton model"))


def test_an_unknown_triton_model_is_not_found(triton: TritonProcess) -> None:
    with pytest.raises(NotFound, match=f"Triton model 'nope' at {triton.url}"):
        TritonForward(TritonSpec(triton.url, "nope"), input_size=SIZE, feature_dim=FEATURES)


def test_an_unreachable_triton_is_unavailable_after_retrying() -> None:
    url = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"Triton at {url} is unreachable"):
        TritonForward(TritonSpec(url, TRITON_MODEL), input_size=SIZE, feature_dim=FEATURES, connect_timeout_s=1.0)
    assert 1.0 <= time.monotonic() - started < 5.0


def test_a_grpcs_url_reaches_triton_over_mutual_tls(
    module: TinyCNN, head: tuple[torch.Tensor, torch.Tensor], tls_triton: TritonProcess, pki: Path, tmp_path: Path
) -> None:
    """model.toml's [triton] with grpcs:// and the PEM files beside it: the same features as the
    local backbone, through Triton over TLS."""
    pem = {"root_certificates": "ca.pem", "private_key": "client.key", "certificate_chain": "client.pem"}
    section = {"triton": {"url": f"grpcs://{tls_triton.url}", "model": TRITON_MODEL, **pem}}
    root = _model_dir(tmp_path / "m", "m", module, head, **section)
    for name in pem.values():
        (root / name).write_bytes((pki / name).read_bytes())
    backend = load_model_dir(root)
    backend.select_runtime(None, lambda: pytest.fail("no ONNX export for a Triton model"))
    assert backend.runtime == "triton" and backend.device == f"grpcs://{tls_triton.url}"
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32))
    with torch.inference_mode():
        np.testing.assert_allclose(backend.features(x).numpy(), module(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["plaintext", "without a client certificate", "trusting another CA"])
def test_a_tls_triton_refuses_what_does_not_match_and_says_unavailable(
    how: str, tls_triton: TritonProcess, pki: Path
) -> None:
    tls = f"grpcs://{tls_triton.url}"
    identity = {"private_key": pki / "client.key", "certificate_chain": pki / "client.pem"}
    spec = {
        "plaintext": TritonSpec(tls_triton.url, TRITON_MODEL),
        "without a client certificate": TritonSpec(tls, TRITON_MODEL, root_certificates=pki / "ca.pem"),
        "trusting another CA": TritonSpec(tls, TRITON_MODEL, root_certificates=pki / "other" / "ca.pem", **identity),
    }[how]
    with pytest.raises(Unavailable, match=f"Triton at {spec.url} is unreachable"):
        TritonForward(spec, input_size=SIZE, feature_dim=FEATURES, connect_timeout_s=1.0)
