"""The tiny CNN, model.toml helpers and a forged PNG header, shared by the backend tests and their fixtures."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

SIZE = 16  # model input side
FEATURES = 8  # d
CLASSES = 3  # C


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, FEATURES, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def render_toml(table: dict[str, Any]) -> str:
    """Just enough TOML for model.toml: scalars and lists (JSON syntax is valid TOML for these)."""
    lines, sections = [], []
    for key, value in table.items():
        if isinstance(value, dict):
            sections.append(f"[{key}]\n" + render_toml(value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines + sections) + "\n"


def default_toml(backbone: str = "backbone.pt") -> dict[str, Any]:
    return {
        "name": "tiny",
        "backbone": backbone,
        "head": "head.safetensors",
        "classes": "classes.txt",
        "preprocess": {
            "size": SIZE,
            "resize": 20,
            "interpolation": "bicubic",
            "mean": [0.5, 0.4, 0.3],
            "std": [0.25, 0.2, 0.3],
        },
    }


MakeModelDir = Callable[..., Path]


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height 8-bit gray: a decompression bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write_tiny_model_dir(root: Path, *, seed: int = 0, **toml: Any) -> Path:
    """A TorchScript TinyCNN model directory: backbone weights from `seed`, head from `seed + 1`;
    `toml` replaces keys of default_toml (a second model: another name, other preprocessing)."""
    import warnings

    import safetensors.torch

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: deprecated, supported
        torch.jit.trace(TinyCNN().eval(), torch.randn(2, 3, SIZE, SIZE)).save(str(root / "backbone.pt"))
    generator = torch.Generator().manual_seed(seed + 1)
    head = {"weight": torch.randn(CLASSES, FEATURES, generator=generator), "bias": torch.randn(CLASSES, generator=generator)}
    safetensors.torch.save_file(head, str(root / "head.safetensors"))
    (root / "classes.txt").write_text("n01440764 tench\nplain name\nn01443537 goldfish\n")
    (root / "model.toml").write_text(render_toml({**default_toml(), **toml}))
    return root
