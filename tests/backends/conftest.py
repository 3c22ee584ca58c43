"""A tiny CNN, saved as TorchScript and torch.export once per session, and model directories around it."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from backends_support import CLASSES, FEATURES, SIZE, MakeModelDir, TinyCNN, default_toml, render_toml


@pytest.fixture(scope="session")
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    module = TinyCNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        module.body[1].running_mean.uniform_(-0.5, 0.5)
        module.body[1].running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.fixture(scope="session")
def head() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(CLASSES, FEATURES, generator=generator), torch.randn(CLASSES, generator=generator)


@pytest.fixture(scope="session")
def backbone_files(tiny_cnn: TinyCNN, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The backbone as TorchScript (.pt), torch.export with a dynamic batch (.pt2) and with a fixed one."""
    root = tmp_path_factory.mktemp("backbones")
    example = torch.randn(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in torch 2.13, still supported
        torch.jit.trace(tiny_cnn, example).save(str(root / "backbone.pt"))
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(tiny_cnn, (example,), dynamic_shapes=({0: batch},)), root / "backbone.pt2")
    torch.export.save(torch.export.export(tiny_cnn, (example,)), root / "static.pt2")
    return {"pt": root / "backbone.pt", "pt2": root / "backbone.pt2", "static": root / "static.pt2"}


@pytest.fixture
def make_model_dir(
    tmp_path: Path, backbone_files: dict[str, Path], head: tuple[torch.Tensor, torch.Tensor]
) -> MakeModelDir:
    """Write a model directory; keyword arguments replace its parts to build the error cases."""
    counter = iter(range(1000))

    def make(
        *,
        backbone: str = "pt",
        toml: dict[str, Any] | None = None,
        head_tensors: dict[str, torch.Tensor] | None = None,
        classes: str = "n01440764 tench\nplain name\nn01443537 goldfish\n",
    ) -> Path:
        root = tmp_path / f"model{next(counter)}"
        root.mkdir()
        source = backbone_files[backbone]
        shutil.copy(source, root / f"backbone{source.suffix}")
        weight, bias = head
        safetensors.torch.save_file(head_tensors or {"weight": weight, "bias": bias}, str(root / "head.safetensors"))
        (root / "classes.txt").write_text(classes)
        table = toml if toml is not None else default_toml(f"backbone{source.suffix}")
        (root / "model.toml").write_text(render_toml(table))
        return root

    return make
