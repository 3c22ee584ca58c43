"""`spurguard export-triton`'s repository: config.pbtxt as Triton parses it, and model files that give torch's features.

Whether a real Triton loads the repository is not tested: the only Triton that installs here is
PyPI nvidia-pytriton (tritonserver 2.51 with the python backend only, in its own numpy<2 venv),
which cannot load onnxruntime_onnx or pytorch_libtorch models. What Triton would run is checked
instead: the config parses into tritonclient's ModelConfig with the model file's own tensor
names, and the model file, run by ONNX Runtime or loaded by torch.jit, gives torch's features.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from backends_support import FEATURES, SIZE, MakeModelDir, TinyCNN
from spurguard.server.backends import builtins as builtins_module
from spurguard.server.backends import PreprocessConfig, load_model, load_model_dir, read_model_toml
from spurguard.server.backends.modeldir import TritonSpec
from spurguard.server.backends.runtimes import probe_inputs
from spurguard.server.backends.torch_backend import TorchBackend
from spurguard.server.backends import triton_repo
from spurguard.server.backends.triton_repo import export_triton, main
from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def read_config(repository: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repository / model / "config.pbtxt").read_text(), mc.ModelConfig())


def assert_equal_features(run: Callable[[np.ndarray], np.ndarray], reference: Callable[[torch.Tensor], torch.Tensor], size: int) -> None:
    """Within 1e-5 of the largest torch feature, at two batch sizes on seeded inputs."""
    for seed, batch in enumerate((5, 2)):
        x = probe_inputs(size, batch, seed)
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).numpy()
        got = run(x)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("backbone", ["pt", "pt2"])
def test_onnx_repository(make_model_dir: MakeModelDir, tiny_cnn: TinyCNN, tmp_path: Path, backbone: str) -> None:
    repository = tmp_path / "repo"
    done = export_triton(str(make_model_dir(backbone=backbone)), repository, max_batch_size=16, instances=2)
    config = read_config(repository, "tiny_backbone")
    assert (config.name, config.platform, config.max_batch_size) == ("tiny_backbone", "onnxruntime_onnx", 16)
    assert [(t.data_type, list(t.dims)) for t in config.input] == [(mc.TYPE_FP32, [3, SIZE, SIZE])]
    assert [(t.data_type, list(t.dims)) for t in config.output] == [(mc.TYPE_FP32, [FEATURES])]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert sorted(p.name for p in (repository / "tiny_backbone").iterdir()) == ["1", "config.pbtxt"]
    # readable as a plain mkdir would make it (a Triton may run as another user)
    assert (repository / "tiny_backbone").stat().st_mode == (repository / "tiny_backbone" / "1").stat().st_mode

    session = ort.InferenceSession(str(repository / "tiny_backbone" / "1" / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == [config.input[0].name] == [done.input.name]
    assert [o.name for o in session.get_outputs()] == [config.output[0].name] == [done.output.name]
    assert_equal_features(lambda x: session.run(None, {config.input[0].name: x})[0], tiny_cnn, SIZE)


@pytest.mark.parametrize("backbone", ["pt", "pt2"])
def test_libtorch_repository(make_model_dir: MakeModelDir, tiny_cnn: TinyCNN, tmp_path: Path, backbone: str) -> None:
    repository = tmp_path / "repo"
    export_triton(str(make_model_dir(backbone=backbone)), repository, platform="pytorch_libtorch", kind="gpu")
    config = read_config(repository, "tiny_backbone")
    assert config.platform == "pytorch_libtorch" and config.max_batch_size == 64  # the GPU default
    assert (config.input[0].name, config.output[0].name) == ("INPUT__0", "OUTPUT__0")
    assert list(config.input[0].dims) == [3, SIZE, SIZE] and list(config.output[0].dims) == [FEATURES]
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, mc.ModelInstanceGroup.KIND_GPU)]
    script = torch.jit.load(str(repository / "tiny_backbone" / "1" / "model.pt"))
    assert_equal_features(lambda x: script(torch.from_numpy(x)).numpy(), tiny_cnn, SIZE)


def test_the_demo_builtin_exports_with_a_model_dir_that_keeps_its_digest(tmp_path: Path) -> None:
    done = export_triton("demo", tmp_path / "repo", model_dir=tmp_path / "demo")
    demo = load_model("demo", device="cpu")
    assert isinstance(demo, TorchBackend)
    session = ort.InferenceSession(str(tmp_path / "repo" / "demo_backbone" / "1" / "model.onnx"))
    assert read_config(tmp_path / "repo", "demo_backbone").input[0].dims == [3, demo.input_size, demo.input_size]
    assert_equal_features(lambda x: session.run(None, {done.input.name: x})[0], demo.module, demo.input_size)

    assert read_model_toml(tmp_path / "demo").triton == TritonSpec("127.0.0.1:8001", "demo_backbone") == done.triton
    copy = load_model_dir(tmp_path / "demo", device="cpu")  # a [triton] model still runs locally, same weights
    assert (copy.name, copy.digest) == ("demo", demo.digest)  # the store's fits stay valid


def test_a_builtin_built_in_code_gets_a_traced_model_dir(
    tiny_cnn: TinyCNN, head: tuple[torch.Tensor, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A built-in with no model directory (as efficientnet_lite0): its eager backbone is traced."""
    preprocess = PreprocessConfig(SIZE, 20, "bilinear", (0.5,) * 3, (0.25,) * 3)

    def loader(device: str) -> TorchBackend:
        return TorchBackend(name="eager", digest="0" * 64, backbone=tiny_cnn, weight=head[0], bias=head[1],
                            preprocess_config=preprocess, class_names=["a", "b", "c"],
                            class_wnids=["n01440764", None, None], device=device)

    monkeypatch.setitem(builtins_module._BUILTINS, "eager", loader)
    export_triton("eager", tmp_path / "repo", url="triton:8001", model_dir=tmp_path / "eager")
    spec = read_model_toml(tmp_path / "eager")
    assert spec.triton == TritonSpec("triton:8001", "eager_backbone") and spec.preprocess == preprocess
    copy = load_model_dir(tmp_path / "eager", device="cpu")
    assert (copy.class_names, copy.class_wnids) == (["a", "b", "c"], ["n01440764", None, None])
    assert all(torch.equal(a, b) for a, b in zip(copy.head(), head))
    assert_equal_features(lambda x: copy.features(torch.from_numpy(x)).numpy(), tiny_cnn, SIZE)


def test_errors(make_model_dir: MakeModelDir, tmp_path: Path) -> None:
    model, repository = str(make_model_dir()), tmp_path / "repo"
    with pytest.raises(NotFound, match="neither a built-in model"):
        export_triton(str(tmp_path / "nope"), repository)
    with pytest.raises(InvalidInput, match="instances"):
        export_triton(model, repository, instances=0)
    with pytest.raises(InvalidInput, match="'triton.url' 'http://h:1' must be HOST:PORT"):
        export_triton(model, repository, url="http://h:1")
    assert not (repository / "tiny_backbone").exists()

    export_triton(model, repository)
    with pytest.raises(FailedPrecondition, match="tiny_backbone exists and is not empty; pass --force"):
        export_triton(model, repository, platform="pytorch_libtorch")
    export_triton(model, repository, platform="pytorch_libtorch", force=True)
    assert [p.name for p in (repository / "tiny_backbone" / "1").iterdir()] == ["model.pt"]


def test_a_model_file_that_differs_from_torch_is_not_written(
    make_model_dir: MakeModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triton_repo, "FEATURE_TOLERANCE", -1.0)  # any deviation is too much
    with pytest.raises(InvalidInput, match="the exported model.onnx gives features .* away from torch's"):
        export_triton(str(make_model_dir()), tmp_path / "repo")
    assert list((tmp_path / "repo").iterdir()) == []  # neither the model nor its staging folder


def test_main_prints_json_and_errors(make_model_dir: MakeModelDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(make_model_dir())
    assert main(["--model", model, "--out", str(tmp_path / "repo"), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["model"] == "tiny_backbone" and document["triton"] == {"url": "127.0.0.1:8001", "model": "tiny_backbone", "root_certificates": None,
                                                                   "private_key": None, "certificate_chain": None}
    assert main(["--model", model, "--out", str(tmp_path / "repo"), "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["error"]["code"] == "FAILED_PRECONDITION" and "pass --force" in err
    with pytest.raises(SystemExit) as caught:
        main(["--model", model, "--out", str(tmp_path / "repo"), "--instances", "0"])
    assert caught.value.code == 2 and "--instances: must be >= 1, got 0" in capsys.readouterr().err
