"""The demo model on every installed forward runtime: the features of the demo's own images
(train and spurious-test) equal torch's, and so do the logits the spurious score uses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spurguard.server.backends import load_model
from spurguard.server.backends.runtimes import FEATURE_TOLERANCE, installed_runtimes
from spurguard.server.demo import DemoDataset
from spurguard.server.store import Store

IMAGES_PER_PART = 48


def _images(demo_data: DemoDataset) -> list[bytes]:
    paths = [p for part in ("train", "spurious_test") for p in sorted(demo_data.paths[part].rglob("*.png"))]
    step = max(1, len(paths) // IMAGES_PER_PART)
    return [p.read_bytes() for p in paths[::step]]


@pytest.mark.parametrize("runtime", [name for name in installed_runtimes() if name != "torch"])
def test_demo_features_equal_torchs_on_every_runtime(demo_data: DemoDataset, tmp_path: Path, runtime: str) -> None:
    reference = load_model("demo", device="cpu")
    backend = load_model("demo", device="cpu")
    store = Store(tmp_path / "store")
    backend.select_runtime(runtime, lambda: store.onnx_graph(backend.name, backend.digest, backend.export_onnx))
    assert (reference.runtime, backend.runtime) == ("torch", runtime)
    pixels = reference.preprocess(_images(demo_data))
    want, got = reference.features(pixels), backend.features(pixels)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= FEATURE_TOLERANCE * scale
    assert torch.equal(reference.logits(want).argmax(1), backend.logits(got).argmax(1))
