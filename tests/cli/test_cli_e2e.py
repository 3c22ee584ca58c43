"""The `spurguard` console script end to end: `spurguard serve` in a subprocess, commands against it.

One server for the module (a tiny TorchScript model directory, random PNGs as its data root);
every command runs as its own process, as a user would run it, and its `--json` output is
checked for SPEC section 3's keys and for values that follow from the method (the logit
decomposition, SpuFix in paper mode, the effect of a label).
"""
from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from backends_support import CLASSES, FEATURES, SIZE, TinyCNN, default_toml, render_toml  # noqa: E402

PER_CLASS = 8
COMPONENTS = 3
SCRIPT = Path(sys.executable).with_name("spurguard")  # the console script pyproject declares
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("SPURGUARD_SERVER", None)
pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="the spurguard console script is not installed")


def _png(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    pixels[:10] //= int(rng.integers(1, 4))  # per-image structure beyond noise
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model/ (TorchScript backbone, head, classes), data/{train/<k>/, spurious/<Spurious ImageNet folder>}."""
    root = tmp_path_factory.mktemp("cli_e2e")
    model = root / "model"
    model.mkdir()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: deprecated, supported
        torch.jit.trace(TinyCNN().eval(), torch.randn(2, 3, SIZE, SIZE)).save(str(model / "backbone.pt"))
    generator = torch.Generator().manual_seed(1)
    head = {"weight": torch.randn(CLASSES, FEATURES, generator=generator), "bias": torch.randn(CLASSES, generator=generator)}
    safetensors.torch.save_file(head, str(model / "head.safetensors"))
    (model / "classes.txt").write_text("ant\nbee\ncat\n")
    (model / "model.toml").write_text(render_toml(default_toml()))
    rng = np.random.default_rng(0)
    folders = {f"train/{k}": PER_CLASS for k in range(CLASSES)} | {"spurious/spurious_imagenet_0_thing_0": 5}
    for folder, count in folders.items():
        (root / "data" / folder).mkdir(parents=True)
        for i in range(count):
            (root / "data" / folder / f"img{i:02d}.png").write_bytes(_png(rng))
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[str]:
    """`spurguard serve --port 0`; yields HOST:PORT once it prints its ready line."""
    command = [str(SCRIPT), "serve", "--model", str(root / "model"), "--store", str(root / "store"), "--port", "0",
               "--device", "cpu", "--data-root", str(root / "data"), "--drain-delay-s", "0"]
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=ENV)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 120)
        line = process.stdout.readline() if ready else ""
        assert line.startswith("spurguard serving on "), line + (root / "server.log").read_text()
        yield line.split()[-1]
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spurguard(server: str, *argv: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    """Run the console script with --server after the command, as SPEC allows; check its exit status."""
    done = subprocess.run([str(SCRIPT), *argv, "--server", server], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == expect, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done


@pytest.fixture(scope="module")
def fitted(server: str) -> dict:
    """`fit --json` over the data root's train/ (a path relative to the root), then class 0 component 0 labelled."""
    done = spurguard(server, "fit", "--model", "tiny", "--data", "train", "--components", str(COMPONENTS), "--json")
    summary = json.loads(done.stdout)
    label = spurguard(server, "label", "--model", "tiny", "--class", "0", "--component", "0", "--as", "spurious",
                      "--note", "background", "--json")
    assert json.loads(label.stdout)["label"] == "spurious"
    return summary


def test_models(server: str) -> None:
    (model,) = json.loads(spurguard(server, "models", "--json").stdout)
    assert (model["name"], model["num_classes"], model["feature_dim"], model["input_size"]) == ("tiny", CLASSES, FEATURES, SIZE)
    assert model["backend"] == "torch" and model["device"] == "cpu"
    assert [(c["index"], c["name"]) for c in model["classes"]] == [(0, "ant"), (1, "bee"), (2, "cat")]  # classes.txt
    assert spurguard(server, "models").stdout.splitlines()[1].split()[:4] == ["tiny", str(CLASSES), str(FEATURES), str(SIZE)]


def test_fit_summary(fitted: dict) -> None:
    assert fitted["model"] == "tiny" and fitted["images"] == CLASSES * PER_CLASS
    assert fitted["classes"] == [{"class": k, "images": PER_CLASS, "num_components": COMPONENTS} for k in range(CLASSES)]


def test_fit_human_output_and_plain_progress(server: str, fitted: dict) -> None:
    done = spurguard(server, "fit", "--model", "tiny", "--data", "train", "--classes", "1", "--extend",
                     "--components", str(COMPONENTS))
    assert done.stdout.startswith("fit ") and " committed for model tiny " in done.stdout
    assert done.stderr.startswith("following fit job ")


def test_components_after_labelling(server: str, fitted: dict) -> None:
    doc = json.loads(spurguard(server, "components", "--model", "tiny", "--class", "0", "--json").stdout)
    assert (doc["model"], doc["class"], doc["images"]) == ("tiny", 0, PER_CLASS)
    keys = {"index", "eigenvalue", "explained_variance", "alpha_mean", "alpha_floor", "alpha_max", "label"}
    assert [keys <= set(c) for c in doc["components"]] == [True] * COMPONENTS
    assert [c["index"] for c in doc["components"]] == list(range(COMPONENTS))
    assert [c["label"] for c in doc["components"]] == ["spurious"] + ["unlabeled"] * (COMPONENTS - 1)
    eigenvalues = [c["eigenvalue"] for c in doc["components"]]
    assert eigenvalues == sorted(eigenvalues, reverse=True)
    assert all(c["alpha_floor"] <= c["alpha_mean"] <= c["alpha_max"] for c in doc["components"])


def test_a_class_by_its_classes_txt_name(server: str, fitted: dict) -> None:
    doc = json.loads(spurguard(server, "components", "--model", "tiny", "--class", "bee", "--json").stdout)
    assert (doc["class"], doc["images"]) == (1, PER_CLASS)
    done = spurguard(server, "components", "--model", "tiny", "--class", "dog", expect=2)
    assert "model tiny has no class named 'dog'; its classes: ant, bee, cat (or give the index)" in done.stderr


def test_score_json_lines_decompose_the_logit(server: str, fitted: dict, root: Path) -> None:
    folder = root / "data" / "train" / "0"
    done = spurguard(server, "score", "--model", "tiny", "--class", "0", "--top", "0", "--spufix", "paper", "--json",
                     str(folder), str(root / "missing.png"), expect=3)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in sorted(folder.iterdir())] + [str(root / "missing.png")]
    assert lines[-1]["error"]["code"] == "NOT_FOUND"
    assert done.stderr.strip() == f"spurguard: 1 of {PER_CLASS + 1} images failed"
    keys = {"image", "predictions", "class", "logit", "bias_term", "residual", "components", "spurious_alpha",
            "trigger", "spufix"}
    for line in lines[:-1]:
        assert keys <= set(line)
        assert line["class"] == 0 and len(line["predictions"]) == CLASSES  # top-5 of 3 classes
        assert set(line["predictions"][0]) == {"class", "name", "prob", "logit"}
        assert sorted(c["index"] for c in line["components"]) == list(range(COMPONENTS))
        alphas = {c["index"]: c["alpha"] for c in line["components"]}
        assert line["logit"] == pytest.approx(line["bias_term"] + line["residual"] + sum(alphas.values()), abs=1e-6)
        assert line["spufix"]["mode"] == "paper"
        assert line["spufix"]["logit"] == pytest.approx(line["logit"] - max(alphas[0], 0.0), abs=1e-6)
        assert line["spurious_alpha"] >= 0.0
    human = spurguard(server, "score", "--model", "tiny", str(folder / "img00.png"))
    assert human.stdout.splitlines()[1].split()[0] == str(folder / "img00.png")


def test_score_of_an_unknown_model_is_a_clean_error(server: str, root: Path) -> None:
    done = spurguard(server, "score", "--model", "nope", str(root / "data" / "train" / "0"), expect=1)
    assert done.stderr.startswith("spurguard: error: NOT_FOUND: ") and done.stderr.count("\n") == 1


def test_evaluate_json(server: str, fitted: dict) -> None:
    done = spurguard(server, "evaluate", "--model", "tiny", "--clean", "train", "--spurious", "spurious",
                     "--spufix", "paper", "--json")
    doc = json.loads(done.stdout)
    class_keys = {"class", "auc", "ap", "clean_mean_prob", "spurious_mean_prob", "clean_frac_predicted",
                  "spurious_frac_predicted"}
    assert [c["class"] for c in doc["classes"]] == [0] and class_keys <= set(doc["classes"][0])
    assert 0.0 <= doc["mean_auc"] <= 1.0 and doc["mean_auc"] == doc["classes"][0]["auc"]
    assert doc["spufix"]["mode"] == "paper" and class_keys <= set(doc["spufix"]["classes"][0])
    assert (doc["clean_images"], doc["spurious_images"]) == (CLASSES * PER_CLASS, 5)


def test_visualize_writes_pngs_and_the_spec_json(server: str, fitted: dict, root: Path, tmp_path: Path) -> None:
    done = spurguard(server, "visualize", "--model", "tiny", "--class", "0", "--component", "0,1", "--out", str(tmp_path),
                     "--steps", "4", "--top-k", "3", "--json")
    doc = json.loads(done.stdout)
    assert (doc["model"], doc["class"]) == ("tiny", 0) and [c["index"] for c in doc["components"]] == [0, 1]
    for component in doc["components"]:
        assert {"index", "start_alpha", "final_alpha", "final_prob", "attack_image", "top_images"} <= set(component)
        assert component["final_alpha"] >= component["start_alpha"] and 0.0 < component["final_prob"] < 1.0
        tops = component["top_images"]
        assert [{"image", "alpha", "heatmap"} <= set(top) for top in tops] == [True] * 3
        assert [top["alpha"] for top in tops] == sorted((top["alpha"] for top in tops), reverse=True)
        assert all((root / "data" / "train" / top["image"]).is_file() for top in tops)  # the fit image's path
        for png in [component["attack_image"], *(top["heatmap"] for top in tops)]:
            assert Path(png).is_relative_to(tmp_path) and Path(png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    frames = sorted(p.name for p in (tmp_path / "class_0" / "component_1").glob("frame_*.png"))
    assert frames == [f"frame_{step:04d}.png" for step in range(5)]  # frame_every defaults to steps / 10, at least 1


def test_connection_refused_is_one_line() -> None:
    started = time.monotonic()
    done = spurguard("127.0.0.1:1", "models", "--timeout", "2", expect=1)
    assert done.stderr.startswith("spurguard: error: UNAVAILABLE: ") and done.stderr.count("\n") == 1
    assert time.monotonic() - started < 30
