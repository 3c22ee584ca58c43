"""The data root holds: no request makes the server read a file outside its `--data-root`s, not
even through a symlink inside them, while links that stay inside are followed.

One in-process server for the module (a real gRPC port) serves the planted CNN with a data root
`data/` beside a folder `outside/` it must never read. Every dataset below is a folder of
`data/`, built of copies and links of `data/train` and `outside/`.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from spurguard.client import Client, FitSummary, SpurguardClientError, TopImage
from spurguard.server.rpc.app import BackgroundServer, ServerConfig
from rpc_support import one_thread_server, random_png

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "visualize"))
from visualize_support import PlantedCNN, make_backend, write_dataset  # noqa: E402

CODE = grpc.StatusCode
COMPONENTS = 2


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("roots").resolve()
    write_dataset(root / "data" / "train", per_class=4, patched=2)
    write_dataset(root / "outside", per_class=4, patched=2, seed=1)
    return root


@pytest.fixture(scope="module")
def server(root: Path) -> Iterator[BackgroundServer]:
    config = ServerConfig(models=(), store=root / "store", port=0, data_roots=(root / "data",), device="cpu",
                          grace_s=2.0)
    with one_thread_server(config, [make_backend(PlantedCNN())]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


def _dataset(root: Path, name: str, classes: tuple[str, ...] = ("0", "1")) -> Path:
    """data/<name>/<class>/: copies of data/train's classes."""
    for k in classes:
        shutil.copytree(root / "data" / "train" / k, root / "data" / name / k)
    return root / "data" / name


def _fit(client: Client, dataset: str) -> FitSummary:
    *_, summary = client.fit("planted", dataset, classes=[0, 1], num_components=COMPONENTS)
    assert isinstance(summary, FitSummary)
    return summary


def _refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SpurguardClientError) as caught:
        call()
    return caught.value.code, caught.value.details


def test_a_class_folder_linked_outside_refuses_the_fit(client: Client, root: Path) -> None:
    dataset = _dataset(root, "class_out", classes=("0",))
    os.symlink(root / "outside" / "1", dataset / "1")
    code, message = _refused(lambda: _fit(client, "class_out"))
    assert code == CODE.PERMISSION_DENIED
    assert f"{str(dataset / '1')!r} is a link that leads outside the server's data roots" in message
    assert str(root / "outside") not in message  # where it leads is not the client's business


def test_a_file_linked_outside_refuses_the_fit_before_anything_is_read(client: Client, root: Path) -> None:
    dataset = _dataset(root, "file_out")
    os.symlink(root / "outside" / "1" / "plain_00.png", dataset / "1" / "zz.png")
    code, message = _refused(lambda: _fit(client, "file_out"))
    assert code == CODE.PERMISSION_DENIED and repr(str(dataset / "1" / "zz.png")) in message
    (job,) = [job for job in client.list_jobs("planted") if job.request.dataset == "file_out"]
    assert job.state == "failed" and job.error is not None and job.error.code == "PERMISSION_DENIED"
    assert job.progress is None or job.progress.images_done == 0  # refused before the first image


def test_links_that_stay_inside_the_root_are_followed(client: Client, root: Path) -> None:
    dataset = root / "data" / "linked"
    dataset.mkdir()
    os.symlink(root / "data" / "train" / "0", dataset / "0")  # a class folder linked inside
    (dataset / "1").mkdir()
    for image in sorted((root / "data" / "train" / "1").iterdir()):
        os.symlink(os.path.relpath(image, dataset / "1"), dataset / "1" / image.name)  # files linked inside
    summary = _fit(client, "linked")
    assert [(k.class_index, k.images) for k in summary.classes] == [(0, 4), (1, 4)]
    tops = [u for u in client.visualize("planted", 1, [0], steps=1, top_k=2, heatmap="none", fit_id=summary.fit_id)
            if isinstance(u, TopImage)]
    assert len(tops) == 2 and all(Path(top.path).parent == dataset / "1" for top in tops)


def test_a_fit_image_swapped_for_a_link_outside_after_the_fit_refuses_visualize(client: Client, root: Path) -> None:
    dataset = _dataset(root, "swapped")
    summary = _fit(client, "swapped")
    for image in sorted((dataset / "0").iterdir()):  # whichever is the top image, it is a link now
        image.unlink()
        os.symlink(root / "outside" / "0" / image.name, image)
    code, message = _refused(lambda: list(client.visualize("planted", 0, [0], steps=1, top_k=1, heatmap="none",
                                                           fit_id=summary.fit_id)))
    assert code == CODE.PERMISSION_DENIED
    assert f"fit image '{dataset / '0'}/" in message and "leads outside the server's data roots" in message


def test_evaluate_refuses_a_clean_folder_with_a_link_outside(client: Client, root: Path) -> None:
    clean = _dataset(root, "clean_out")
    os.symlink(root / "outside" / "1" / "plain_00.png", clean / "0" / "zz.png")
    spurious = root / "data" / "spurious" / "spurious_imagenet_0_thing_1"
    spurious.mkdir(parents=True)
    for i in range(2):
        (spurious / f"s{i}.png").write_bytes(random_png(np.random.default_rng(i)))
    _fit(client, "train")
    code, message = _refused(lambda: list(client.evaluate("planted", "clean_out", "spurious")))
    assert code == CODE.PERMISSION_DENIED and repr(str(clean / "0" / "zz.png")) in message
