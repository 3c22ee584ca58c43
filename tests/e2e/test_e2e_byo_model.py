"""Bring your own model: a small CNN defined and trained here, exported to a model directory,
served by a real server process on each forward runtime, fitted and scored over gRPC, and
checked against an independent float64 reference (the module run in float64 on pixels decoded
here, np.cov + np.linalg.eigh on the stored weighted activations)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from torch import nn

from spurguard.client import Client
from spurguard.server.rpc.process import ServerProcess

SIZE, CLASSES, PER_CLASS, COMPONENTS = 16, 3, 12, 4
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _images(root: Path) -> dict[str, np.ndarray]:
    """Class k's images are noise tinted towards channel k: learnable, and different per class."""
    rng = np.random.default_rng(5)
    pixels = {}
    for k in range(CLASSES):
        (root / str(k)).mkdir(parents=True)
        for i in range(PER_CLASS):
            image = rng.integers(0, 150, (SIZE, SIZE, 3), dtype=np.uint8)
            image[..., k] += rng.integers(60, 100, dtype=np.uint8)
            Image.fromarray(image).save(root / str(k) / f"{i:02d}.png")
            pixels[f"{k}/{i:02d}.png"] = image
    return pixels


def _normalised(images: list[np.ndarray]) -> np.ndarray:
    x = np.stack(images).astype(np.float64) / 255.0
    return ((x - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module", params=["torch", "onnxruntime", "openvino"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The server runs the forward pass on each runtime in turn (`serve --runtime`)."""
    root = tmp_path_factory.mktemp("byo")
    pixels = _images(root / "data")
    torch.manual_seed(0)
    model = SmallCNN()
    ids = sorted(pixels)
    x = torch.tensor(_normalised([pixels[i] for i in ids]), dtype=torch.float32)
    y = torch.tensor([int(i.split("/")[0]) for i in ids])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.9  # it learned the tints
    model_dir = root / "model"
    model_dir.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: deprecated in 2.13, still supported
        torch.jit.trace(model.backbone, x[:2]).save(str(model_dir / "backbone.pt"))
    safetensors.torch.save_file(
        {"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()},
        model_dir / "head.safetensors",
    )
    (model_dir / "classes.txt").write_text("red\ngreen\nblue\n")
    (model_dir / "model.toml").write_text(
        'name = "byo"\nbackbone = "backbone.pt"\nhead = "head.safetensors"\nclasses = "classes.txt"\n'
        f"[preprocess]\nsize = {SIZE}\nresize = {SIZE}\ninterpolation = \"bilinear\"\n"
        f"mean = {json.dumps(list(MEAN))}\nstd = {json.dumps(list(STD))}\n"
    )
    args = ["--model", str(model_dir), "--store", str(root / "store"), "--data-root", str(root / "data"),
            "--runtime", request.param]
    with ServerProcess(args) as server, Client(server.target) as client:
        assert client.get_model("byo").runtime == request.param
        yield client, model.double(), pixels, root / "data"


def test_fit_and_score_equal_a_float64_reference(served) -> None:
    client, model, pixels, data = served
    *_, summary = client.fit("byo", str(data), num_components=COMPONENTS)
    assert [c.class_index for c in summary.classes] == [0, 1, 2]
    k = 1
    ids = sorted(i for i in pixels if i.startswith(f"{k}/"))
    with torch.no_grad():
        phi = model.backbone(torch.tensor(_normalised([pixels[i] for i in ids]))).numpy()
    weight, bias = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    activations = phi * weight[k]
    mean = activations.mean(0)
    values, vectors = np.linalg.eigh(np.cov(activations, rowvar=False))
    values, vectors = values[::-1][:COMPONENTS], vectors[:, ::-1][:, :COMPONENTS].T
    alphas = ((activations - mean) @ vectors.T) * vectors.sum(1)

    components = client.get_components("byo", k)
    np.testing.assert_allclose([c.eigenvalue for c in components.components], values, rtol=1e-3)

    results = client.score("byo", [str(data / i) for i in ids], class_index=k, top=0)
    logits = phi @ weight.T + bias
    for row, result in enumerate(results):
        assert result.logit == pytest.approx(logits[row, k], abs=1e-4)
        assert result.bias_term == pytest.approx(bias[k] + mean.sum(), abs=1e-4)
        got = {c.index: c.alpha for c in result.components}
        scale = np.abs(alphas).max()
        np.testing.assert_allclose([got[l] for l in range(COMPONENTS)], alphas[row], atol=1e-4 * scale)
        assert result.predictions[0].class_index == int(logits[row].argmax())
