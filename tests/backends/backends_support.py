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
