"""The shipped demo model, and the dataset it was trained on, regenerated once per session from
the generator settings recorded in the model's train_report.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spurguard.server.backends import TorchBackend, load_model
from spurguard.server.demo import DEMO_MODEL_DIR, DemoDataset, generate


@pytest.fixture(scope="session")
def demo_report() -> dict[str, Any]:
    return json.loads((DEMO_MODEL_DIR / "train_report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def backend() -> TorchBackend:
    model = load_model("demo", device="cpu")
    assert isinstance(model, TorchBackend)
    return model


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory, demo_report: dict[str, Any]) -> DemoDataset:
    root: Path = tmp_path_factory.mktemp("demo") / "data"
    return generate(root, **demo_report["generator"])
