"""Shared by the rpc tests: a gate that holds a backbone's forward pass mid-run (disconnect,
cancel) and counts the passes, a scrape of the metrics endpoint, small PNGs, the tiny model's
directory, a token file's entry, and an in-process server on one torch thread."""
from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from spurguard.server.backends import Backend
from spurguard.server.rpc.app import BackgroundServer, ServerConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))


class Gated(nn.Module):
    """Mix in before a backbone class: its forward waits while `gate` is clear and counts its
    calls, and the passes waiting at the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0
        self.waiting = 0
        self._count = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._count:
            self.waiting += 1
        self.gate.wait(timeout=20)
        with self._count:
            self.waiting -= 1
            self.calls += 1
        return super().forward(x)


def scrape_metrics(port: int) -> tuple[str, dict[str, float]]:
    """The metrics endpoint's text and its samples by series name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and line[0] != "#"}
    return text, samples


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def random_png(rng: np.random.Generator, size: int = 20) -> bytes:
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    pixels[: size // 2] //= int(rng.integers(1, 4))  # per-image structure beyond noise
    return png(pixels)


def token_entry(name: str, role: str, token: str) -> str:
    """One `[[token]]` table of an `--auth-tokens` file."""
    return f'[[token]]\nname = "{name}"\nrole = "{role}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'


def write_data_root(root: Path, classes: int, per_class: int, spurious: int, seed: int = 0) -> Path:
    """A server's data root of random PNGs: train/<class>/ and a Spurious ImageNet folder
    (spurious_imagenet_0_thing_1) of `spurious` images for class 0."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / "train" / str(k)).mkdir(parents=True)
        for i in range(per_class):
            (root / "train" / str(k) / f"img{i:02d}.png").write_bytes(random_png(rng))
    folder = root / "spurious" / "spurious_imagenet_0_thing_1"
    folder.mkdir(parents=True)
    for i in range(spurious):
        (folder / f"s{i}.png").write_bytes(random_png(rng))
    return root


@contextlib.contextmanager
def one_thread_server(config: ServerConfig, backends: Sequence[Backend]) -> Iterator[BackgroundServer]:
    """A BackgroundServer with torch on one thread while it runs: the tests' tensors are tiny and
    the test machines share two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with BackgroundServer(config, backends=backends) as running:
            yield running
    finally:
        torch.set_num_threads(threads)
