"""Forward runtimes: every installed one gives torch's features (and float64-exact alphas), the
exported graph is cached per digest, a model's own ONNX graph is used as shipped, and bad
graphs or unknown runtimes are clear errors at load."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backends_support import FEATURES, SIZE, MakeModelDir, TinyCNN, default_toml
from spurguard.server.backends import load_model_dir, read_model_toml
from spurguard.server.backends import runtimes as runtimes_module
from spurguard.server.backends.runtimes import FEATURE_TOLERANCE, installed_runtimes, probe_inputs
from spurguard.server.engine import Decomposer, fit_components
from spurguard.server.errors import FailedPrecondition, InvalidInput
from spurguard.server.store import Store

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
RUNTIMES = installed_runtimes()
ONNX_RUNTIMES = [name for name in RUNTIMES if name != "torch"]


def _graph(store: Store, backend) -> Path:  # noqa: ANN001
    return store.onnx_graph(backend.name, backend.digest, backend.export_onnx)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_onnx_runtime_and_openvino_are_installed() -> None:
    assert RUNTIMES == ["torch", "onnxruntime", "openvino"]  # the server extra brings both


@pytest.mark.parametrize("backbone", ["pt", "pt2"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_gives_torchs_features_and_float64_alphas(
    make_model_dir: MakeModelDir, store: Store, tiny_cnn: TinyCNN, backbone: str, runtime: str
) -> None:
    backend = load_model_dir(make_model_dir(backbone=backbone), device="cpu", max_batch_size=8)
    choice = backend.select_runtime(runtime, lambda: _graph(store, backend))
    assert backend.runtime == runtime and choice.forward.runtime == runtime
    x = torch.from_numpy(probe_inputs(SIZE, 19, seed=7))  # 19: three chunks of 8, the last short
    got = backend.features(x)
    # the reference: the same weights run in float64 by torch, and alphas from it in float64
    reference = copy.deepcopy(tiny_cnn).double()(x.double()).detach().numpy()
    assert np.abs(got.numpy() - reference).max() <= FEATURE_TOLERANCE * np.abs(reference).max()
    weight, bias = backend.head()
    labels = np.arange(19) % 3
    fitted = fit_components(weight.double(), reference, labels, num_components=4)
    alphas = Decomposer(fitted, weight, bias).decompose(got, torch.from_numpy(labels)).alphas.numpy()
    for k, components in fitted.items():
        rows = labels == k
        centered = weight[k].double().numpy() * reference[rows] - components.mean
        want = (centered @ components.vectors.T) * components.vectors.sum(axis=1)
        assert np.abs(alphas[rows, : want.shape[1]] - want).max() <= 1e-4 * np.abs(want).max()


def test_auto_times_the_equal_runtimes_and_keeps_the_fastest(make_model_dir: MakeModelDir, store: Store) -> None:
    backend = load_model_dir(make_model_dir(backbone="pt2"), device="cpu", max_batch_size=8)
    choice = backend.select_runtime("auto", lambda: _graph(store, backend))
    assert [t.runtime for t in choice.trials] == RUNTIMES
    assert all(t.equal and t.images_per_s is not None and t.images_per_s > 0 for t in choice.trials)
    fastest = max(choice.trials, key=lambda t: t.images_per_s or 0.0)
    assert backend.runtime == fastest.runtime
    assert fastest.runtime in choice.describe() and "img/s" in choice.describe()


def test_openvino_runs_in_f32(make_model_dir: MakeModelDir, store: Store) -> None:
    if "openvino" not in RUNTIMES:
        pytest.skip("openvino is not installed")
    backend = load_model_dir(make_model_dir(), device="cpu")
    backend.select_runtime("openvino", lambda: _graph(store, backend))
    assert str(backend.forward.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"


def test_onnx_runtime_threads_sleep_between_runs(make_model_dir: MakeModelDir, store: Store) -> None:
    """Spinning intra-op threads would take the cores the decode threads need between batches."""
    backend = load_model_dir(make_model_dir(), device="cpu")
    backend.select_runtime("onnxruntime", lambda: _graph(store, backend))
    options = backend.forward.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_the_exported_graph_is_cached_per_digest(
    make_model_dir: MakeModelDir, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = load_model_dir(make_model_dir(), device="cpu")
    exports: list[Path] = []
    export = backend.export_onnx
    monkeypatch.setattr(backend, "export_onnx", lambda path: (exports.append(path), export(path))[1])
    first = _graph(store, backend)
    stamp = first.stat().st_mtime_ns
    assert _graph(store, backend) == first and len(exports) == 1  # reused, not exported again
    again = load_model_dir(make_model_dir(), device="cpu")  # the same files: the same digest
    assert again.digest == backend.digest and _graph(store, again) == first and first.stat().st_mtime_ns == stamp
    other = load_model_dir(make_model_dir(toml={**default_toml(), "name": "other"}), device="cpu")
    assert _graph(store, other) != first  # another model never reuses this graph
    assert [p.name for p in first.parent.iterdir()] == ["backbone.onnx"]  # no temp file left


def test_a_model_dir_with_its_own_onnx_graph_uses_it(
    make_model_dir: MakeModelDir, store: Store, tmp_path: Path
) -> None:
    exporter = load_model_dir(make_model_dir(), device="cpu")
    exporter.export_onnx(tmp_path / "shipped.onnx")
    root = make_model_dir(toml={**default_toml(), "onnx": "backbone.onnx", "runtime": "onnxruntime"})
    (root / "backbone.onnx").write_bytes((tmp_path / "shipped.onnx").read_bytes())
    assert read_model_toml(root).onnx == root / "backbone.onnx" and read_model_toml(root).runtime == "onnxruntime"
    backend = load_model_dir(root, device="cpu")

    def must_not_export() -> Path:
        raise AssertionError("a shipped graph is used as it is")

    backend.select_runtime(None, must_not_export)  # None: the model's own runtime key
    assert backend.runtime == "onnxruntime"
    x = torch.from_numpy(probe_inputs(SIZE, 5))
    torch_features = exporter.features(x)
    assert torch.allclose(backend.features(x), torch_features, rtol=0, atol=1e-5 * float(torch_features.abs().max()))


class Wider(nn.Module):
    """A backbone whose features are one wider than the head expects."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, FEATURES + 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def _write_graph(module: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(2, 3, SIZE, SIZE),), str(path), dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})


@pytest.mark.parametrize("runtime", ["auto", *ONNX_RUNTIMES])
def test_a_shipped_graph_with_the_wrong_feature_size_is_an_error(
    make_model_dir: MakeModelDir, store: Store, runtime: str
) -> None:
    root = make_model_dir(toml={**default_toml(), "onnx": "backbone.onnx"})
    _write_graph(Wider(), root / "backbone.onnx")
    backend = load_model_dir(root, device="cpu")
    with pytest.raises(InvalidInput, match=rf"runtime \w+: its features are \[3, {FEATURES + 1}\].*\[3, {FEATURES}\]"):
        backend.select_runtime(runtime, lambda: _graph(store, backend))
    assert backend.runtime == "torch"  # nothing was switched


@pytest.mark.parametrize("runtime", ["auto", *ONNX_RUNTIMES])
def test_a_corrupt_shipped_graph_is_an_error(make_model_dir: MakeModelDir, store: Store, runtime: str) -> None:
    root = make_model_dir(toml={**default_toml(), "onnx": "backbone.onnx"})
    (root / "backbone.onnx").write_bytes(b"\x08\x07 this is not an onnx graph")
    backend = load_model_dir(root, device="cpu")
    with pytest.raises(InvalidInput, match=r"backbone\.onnx: (ONNX Runtime|OpenVINO) cannot load it"):
        backend.select_runtime(runtime, lambda: _graph(store, backend))


def test_a_graph_that_disagrees_with_torch_is_refused(make_model_dir: MakeModelDir, store: Store) -> None:
    """A shipped graph from other weights: the right shapes, other features."""
    root = make_model_dir(toml={**default_toml(), "onnx": "backbone.onnx"})
    torch.manual_seed(99)
    _write_graph(TinyCNN(), root / "backbone.onnx")
    backend = load_model_dir(root, device="cpu")
    with pytest.raises(InvalidInput, match="away from torch's, over the tolerance"):
        backend.select_runtime("auto", lambda: _graph(store, backend))


def test_an_exported_graph_that_fails_leaves_auto_on_torch(make_model_dir: MakeModelDir, store: Store) -> None:
    backend = load_model_dir(make_model_dir(), device="cpu")

    def broken_export() -> Path:
        raise InvalidInput("the backbone cannot be exported to ONNX (unsupported op)")

    choice = backend.select_runtime("auto", broken_export)
    assert backend.runtime == "torch"
    assert {t.runtime: t.error for t in choice.trials if t.runtime != "torch"} == {
        name: "the backbone cannot be exported to ONNX (unsupported op)" for name in ONNX_RUNTIMES}
    with pytest.raises(InvalidInput, match="runtime onnxruntime: the backbone cannot be exported"):
        backend.select_runtime("onnxruntime", broken_export)  # asked for by name: an error


def test_unknown_and_missing_runtimes(make_model_dir: MakeModelDir, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInput, match=r"'runtime' 'tensorflow' must be one of auto, torch, onnxruntime, openvino"):
        read_model_toml(make_model_dir(toml={**default_toml(), "runtime": "tensorflow"}))
    backend = load_model_dir(make_model_dir(), device="cpu")
    monkeypatch.setattr(runtimes_module.importlib.util, "find_spec", lambda name: None)
    assert installed_runtimes() == ["torch"]
    with pytest.raises(FailedPrecondition, match="runtime openvino is not installed here .pip install openvino."):
        backend.select_runtime("openvino", lambda: _graph(store, backend))
    assert backend.select_runtime("auto", lambda: _graph(store, backend)).forward.runtime == "torch"
