"""Model directories: round trip against the original module, every model.toml error, digests."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from backends_support import CLASSES, FEATURES, SIZE, MakeModelDir, TinyCNN, default_toml
from spurguard.server.backends import GradientBackend, load_model, load_model_dir, read_model_toml
from spurguard.server.backends import builtins as builtins_module
from spurguard.server.backends.modeldir import TritonSpec, model_toml_text, read_classes
from spurguard.server.errors import InvalidInput, NotFound

# TorchScript backbones are part of the contract (SPEC §2) though torch 2.13 deprecates torch.jit.load.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def reference_input(n: int) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("backbone", ["pt", "pt2"])
def test_round_trip_equals_original_module(
    backbone: str, make_model_dir: MakeModelDir, tiny_cnn: TinyCNN, head: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = load_model_dir(make_model_dir(backbone=backbone), device="cpu", max_batch_size=2)
    assert isinstance(model, GradientBackend)
    assert (model.name, model.kind, model.device) == ("tiny", "torch", "cpu")
    assert (model.num_classes, model.feature_dim, model.input_size) == (CLASSES, FEATURES, SIZE)
    assert model.class_names == ["tench", "plain name", "goldfish"]
    assert model.class_wnids == ["n01440764", None, "n01443537"]
    x = reference_input(5)  # 5 images in chunks of max_batch_size = 2
    with torch.no_grad():
        expected = tiny_cnn(x)
    features = model.features(x)
    assert features.dtype == torch.float32 and features.device.type == "cpu" and not features.requires_grad
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    weight, bias = head
    torch.testing.assert_close(model.logits(features), expected @ weight.T + bias, rtol=1e-5, atol=1e-5)
    model_weight, model_bias = model.head()
    assert torch.equal(model_weight, weight) and torch.equal(model_bias, bias)
    assert model.warm_up(2) >= 0


@pytest.mark.parametrize("backbone", ["pt", "pt2"])
def test_features_with_grad_reaches_the_input(backbone: str, make_model_dir: MakeModelDir) -> None:
    model = load_model_dir(make_model_dir(backbone=backbone), device="cpu")
    assert not any(p.requires_grad for p in model.module.parameters())
    x = reference_input(2).requires_grad_(True)
    model.logits(model.features_with_grad(x))[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_preprocess_uses_the_toml(make_model_dir: MakeModelDir) -> None:
    model = load_model_dir(make_model_dir(), device="cpu")
    assert model.preprocess_config.resize == 20 and model.preprocess_config.std == (0.25, 0.2, 0.3)
    gray = np.full((30, 40, 3), 128, dtype=np.uint8)
    x = model.preprocess([gray, gray])
    assert x.shape == (2, 3, SIZE, SIZE)
    expected = (128 / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.25, 0.2, 0.3])
    torch.testing.assert_close(x[0, :, 5, 5], expected)


def test_bad_input_shape(make_model_dir: MakeModelDir) -> None:
    model = load_model_dir(make_model_dir(), device="cpu")
    with pytest.raises(InvalidInput, match=rf"expects input \[N,3,{SIZE},{SIZE}\], got \[2, 3, 8, 8\]"):
        model.features(torch.zeros(2, 3, 8, 8))
    with pytest.raises(InvalidInput, match=rf"expects features \[N,{FEATURES}\]"):
        model.logits(torch.zeros(2, FEATURES + 1))


def with_toml(
    top: dict | None = None,
    preprocess: dict | None = None,
    drop: tuple[str, ...] = (),
    drop_preprocess: tuple[str, ...] = (),
) -> dict:
    """default_toml() with keys replaced (`top`, `preprocess`) or removed (`drop*`)."""
    table = default_toml()
    table["preprocess"].update(preprocess or {})
    for key in drop_preprocess:
        del table["preprocess"][key]
    table.update(top or {})
    for key in drop:
        del table[key]
    return table


@pytest.mark.parametrize(
    "toml, message",
    [
        (with_toml({"labels": "x"}), r"unknown key\(s\): labels"),
        (with_toml(preprocess={"crop_pct": 0.9}), r"unknown key\(s\) in \[preprocess\]: crop_pct"),
        (with_toml(drop=("head",)), "missing required key 'head'"),
        (with_toml(drop=("preprocess",)), "missing required key 'preprocess'"),
        (with_toml(drop_preprocess=("mean",)), "missing required key 'preprocess.mean'"),
        (with_toml({"backbone": "missing.pt"}), "'backbone' file 'missing.pt' does not exist"),
        (with_toml({"classes": "nope.txt"}), "'classes' file 'nope.txt' does not exist"),
        (with_toml({"name": 3}), "'name' must be a string, got int"),
        (with_toml({"name": "has space"}), "'name' 'has space' must be"),
        (with_toml(preprocess={"size": "16"}), "'preprocess.size' must be an integer, got str"),
        (with_toml(preprocess={"size": True}), "'preprocess.size' must be an integer, got bool"),
        (with_toml(preprocess={"resize": 8}), r"preprocess.resize \(8\) must be >= preprocess.size \(16\)"),
        (with_toml(preprocess={"interpolation": "nearest"}), "must be 'bicubic' or 'bilinear'"),
        (with_toml(preprocess={"mean": [0.5, 0.5]}), "'preprocess.mean' must be a list of 3 numbers, got 2"),
        (with_toml(preprocess={"std": [0.2, "x", 0.2]}), "'preprocess.std' must be a list of 3 numbers, got str"),
        (with_toml(preprocess={"std": [0.2, 0.0, 0.2]}), "std values must be positive"),
        (with_toml({"preprocess": 5}), r"'preprocess' must be a table"),
        (with_toml({"triton": "x:1"}), r"'triton' must be a table"),
        (with_toml({"triton": {"url": "h:8001"}}), "missing required key 'triton.model'"),
        (with_toml({"triton": {"url": "h:8001", "model": "m", "version": 1}}), r"unknown key\(s\) in \[triton\]: version"),
        (with_toml({"triton": {"url": 8001, "model": "m"}}), "'triton.url' must be a string HOST:PORT, got int"),
        (with_toml({"triton": {"url": "http://h:8000", "model": "m"}}), "'triton.url' 'http://h:8000' must be HOST:PORT"),
        (with_toml({"triton": {"url": "h:8001", "model": "m", "root_certificates": "classes.txt"}}),
         "'triton.root_certificates' needs TLS: write the url as grpcs://h:8001"),
        (with_toml({"triton": {"url": "grpcs://h:8001", "model": "m", "private_key": "classes.txt"}}),
         "give both 'triton.private_key' and 'triton.certificate_chain'"),
        (with_toml({"triton": {"url": "grpcs://h:8001", "model": "m", "root_certificates": "ca.pem"}}),
         "'triton.root_certificates' file 'ca.pem' does not exist"),
        (with_toml({"triton": {"url": "h:0", "model": "m"}}), "'triton.url' 'h:0' must be HOST:PORT"),
        (with_toml({"triton": {"url": "h:8001", "model": "a/b"}}), "'triton.model' 'a/b' must be"),
    ],
)
def test_model_toml_errors(toml: dict, message: str, make_model_dir: MakeModelDir) -> None:
    root = make_model_dir(toml=toml)
    with pytest.raises(InvalidInput, match=message) as caught:
        load_model_dir(root, device="cpu")
    assert "model.toml" in str(caught.value) and "\n" not in str(caught.value)


def test_a_triton_section_is_kept_on_the_spec_and_the_backend(make_model_dir: MakeModelDir) -> None:
    """Loading reaches no Triton: the forward moves there in select_runtime (test_backends_triton.py)."""
    root = make_model_dir(toml=with_toml({"triton": {"url": "[::1]:8001", "model": "tiny_backbone"}}))
    spec = TritonSpec(url="[::1]:8001", model="tiny_backbone")
    assert read_model_toml(root).triton == spec
    model = load_model_dir(root, device="cpu")
    assert model.triton == spec and model.runtime == "torch"


@pytest.mark.parametrize(
    "toml",
    [
        with_toml(),
        with_toml(drop=("classes",)),
        with_toml({"runtime": "onnxruntime", "triton": {"url": "h:8001", "model": "tiny_backbone"}}),
    ],
)
def test_model_toml_text_reads_back_as_the_spec(make_model_dir: MakeModelDir, toml: dict) -> None:
    root = make_model_dir(toml=toml)
    spec = read_model_toml(root)
    (root / "model.toml").write_text(model_toml_text(spec))
    assert read_model_toml(root) == spec


def test_not_toml(make_model_dir: MakeModelDir) -> None:
    root = make_model_dir()
    (root / "model.toml").write_text("name = [unclosed\n")
    with pytest.raises(InvalidInput, match="model.toml: not valid TOML"):
        read_model_toml(root)


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="model.toml not found"):
        load_model_dir(tmp_path)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"weight": torch.zeros(CLASSES * FEATURES), "bias": torch.zeros(CLASSES)}, r"must be \[C,d\]"),
        ({"weight": torch.zeros(CLASSES, FEATURES), "bias": torch.zeros(CLASSES + 1)}, r"must be \[C,d\]"),
        ({"weight": torch.zeros(CLASSES, FEATURES)}, "exactly tensors 'weight' and 'bias'"),
        (
            {"weight": torch.zeros(CLASSES, FEATURES), "bias": torch.zeros(CLASSES), "scale": torch.zeros(1)},
            "exactly tensors 'weight' and 'bias'",
        ),
        ({"weight": torch.zeros(CLASSES, FEATURES, dtype=torch.int32), "bias": torch.zeros(CLASSES)}, "floating point"),
        ({"weight": torch.full((CLASSES, FEATURES), float("nan")), "bias": torch.zeros(CLASSES)}, "non-finite"),
        (
            {"weight": torch.zeros(CLASSES, FEATURES + 2), "bias": torch.zeros(CLASSES)},
            "8-d features but the head expects d = 10",
        ),
    ],
)
def test_head_errors(tensors: dict[str, torch.Tensor], message: str, make_model_dir: MakeModelDir) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_model_dir(make_model_dir(head_tensors=tensors, classes="a\nb\nc\n"), device="cpu")


def test_head_not_safetensors(make_model_dir: MakeModelDir) -> None:
    root = make_model_dir()
    (root / "head.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidInput, match="head.safetensors: not a safetensors file"):
        load_model_dir(root, device="cpu")


@pytest.mark.parametrize(
    "classes, message",
    [("a\nb\n", "2 lines but the head has C = 3"), ("a\n\nc\n", "line 2 is empty"), ("a\nb\nc\nd\n", "4 lines")],
)
def test_classes_errors(classes: str, message: str, make_model_dir: MakeModelDir) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_model_dir(make_model_dir(classes=classes), device="cpu")


def test_classes_parsing(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("n01440764 tench\n  n02123045 tabby cat  \nn0212\nn02123159\nplain name\n")
    assert read_classes(path) == [
        ("n01440764", "tench"),
        ("n02123045", "tabby cat"),
        (None, "n0212"),
        ("n02123159", "n02123159"),
        (None, "plain name"),
    ]


def test_no_classes_file_names_by_index(make_model_dir: MakeModelDir) -> None:
    toml = default_toml()
    del toml["classes"]
    model = load_model_dir(make_model_dir(toml=toml), device="cpu")
    assert model.class_names == ["0", "1", "2"] and model.class_wnids == [None, None, None]


def test_backbone_errors(make_model_dir: MakeModelDir, tiny_cnn: TinyCNN) -> None:
    root = make_model_dir()
    (root / "backbone.pt").write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match="backbone.pt: not a TorchScript archive"):
        load_model_dir(root, device="cpu")
    torch.save(tiny_cnn.state_dict(), root / "backbone.pt")  # a pickled state dict is no TorchScript
    with pytest.raises(InvalidInput, match="backbone.pt: not a TorchScript archive"):
        load_model_dir(root, device="cpu")
    shutil.move(root / "backbone.pt", root / "backbone.pth")
    (root / "model.toml").write_text((root / "model.toml").read_text().replace("backbone.pt", "backbone.pth"))
    with pytest.raises(InvalidInput, match=r"backbone must be TorchScript \(.pt\) or a torch.export archive \(.pt2\)"):
        load_model_dir(root, device="cpu")


def test_fixed_batch_export_is_refused(make_model_dir: MakeModelDir) -> None:
    with pytest.raises(InvalidInput, match=rf"backbone fails on a \[1,3,{SIZE},{SIZE}\] input"):
        load_model_dir(make_model_dir(backbone="static"), device="cpu")


def rewrite_zip(path: Path, edit: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    entries.update(edit)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def test_pickled_pt2_entries_are_refused(make_model_dir: MakeModelDir) -> None:
    root = make_model_dir(backbone="pt2")
    path = root / "backbone.pt2"
    with zipfile.ZipFile(path) as archive:
        config_name = next(n for n in archive.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(archive.read(config_name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    rewrite_zip(path, {config_name: json.dumps(config).encode()})
    with pytest.raises(InvalidInput, match=f"tensor '{first}' is stored pickled"):
        load_model_dir(root, device="cpu")


def test_native_code_in_pt2_is_refused(make_model_dir: MakeModelDir) -> None:
    root = make_model_dir(backbone="pt2")
    top = zipfile.ZipFile(root / "backbone.pt2").namelist()[0].split("/")[0]
    rewrite_zip(root / "backbone.pt2", {f"{top}/data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(InvalidInput, match="refusing torch.export archive entry 'data/aotinductor"):
        load_model_dir(root, device="cpu")


def test_digest_is_stable_and_tracks_every_part(make_model_dir: MakeModelDir) -> None:
    first = make_model_dir()
    digest = load_model_dir(first, device="cpu").digest
    assert len(digest) == 64 and digest == load_model_dir(make_model_dir(), device="cpu").digest

    changed_weight = make_model_dir()
    tensors = safetensors.torch.load_file(str(changed_weight / "head.safetensors"))
    tensors["weight"][0, 0] += 1e-3
    safetensors.torch.save_file(tensors, str(changed_weight / "head.safetensors"))
    changed_classes = make_model_dir(classes="a\nb\nc\n")
    changed_preprocess = make_model_dir(toml=with_toml(preprocess={"resize": 24}))
    changed_backbone = make_model_dir(backbone="pt2")
    digests = {
        load_model_dir(root, device="cpu").digest
        for root in (changed_weight, changed_classes, changed_preprocess, changed_backbone)
    }
    assert len(digests | {digest}) == 5


def test_load_model_by_directory_toml_or_name(make_model_dir: MakeModelDir, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_model_dir()
    assert load_model(str(root), device="cpu").name == "tiny"
    assert load_model(str(root / "model.toml"), device="cpu", max_batch_size=3).max_batch_size == 3
    with pytest.raises(NotFound, match="neither a built-in model .*efficientnet_lite0.* nor a model directory"):
        load_model(str(root / "missing"), device="cpu")

    monkeypatch.setattr(builtins_module, "_BUILTINS", {})
    calls: list[str] = []

    def loader(device: str) -> GradientBackend:
        calls.append(device)
        return load_model_dir(root, device=device)

    builtins_module.register_builtin("demo", loader)
    assert builtins_module.builtin_names() == ["demo"]
    assert load_model("demo", device="cpu", max_batch_size=7).max_batch_size == 7 and calls == ["cpu"]
    with pytest.raises(ValueError, match="already registered"):
        builtins_module.register_builtin("demo", loader)
