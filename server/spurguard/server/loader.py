"""Batches of decoded, preprocessed images, prepared one batch ahead of the forward pass.

Decoding runs in a background thread so that it overlaps the model's forward pass (PIL releases
the GIL while it decodes and resizes). It stops at uint8 crops; the thread that runs the model
normalises them, so that no torch op competes with the forward pass for the cores. An unreadable
image is skipped and reported, not fatal: one corrupt file must not throw away an hour-long fit.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from spurguard.server.datasets import ImageEntry
from spurguard.server.errors import SpurguardError


class Preprocessor(Protocol):
    def decode_crop(self, image: bytes) -> np.ndarray: ...

    def stack_crops(self, crops: Sequence[np.ndarray]) -> torch.Tensor: ...


class FeatureExtractor(Preprocessor, Protocol):
    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Batch:
    """Images of one forward pass; `skipped` are those of its slice that could not be read."""

    entries: list[ImageEntry]
    crops: list[np.ndarray]  # uint8 [H, W, 3] per entry; normalised by the thread that runs the model
    skipped: list[tuple[ImageEntry, str]] = field(default_factory=list)


def _prepare(entries: Sequence[ImageEntry], backend: Preprocessor) -> Batch:
    good: list[ImageEntry] = []
    crops: list[np.ndarray] = []
    skipped: list[tuple[ImageEntry, str]] = []
    for entry in entries:
        try:
            crops.append(backend.decode_crop(entry.path.read_bytes()))
            good.append(entry)
        except (OSError, SpurguardError) as error:
            skipped.append((entry, str(error)))
    return Batch(good, crops, skipped)


def iter_batches(
    entries: Sequence[ImageEntry],
    backend: Preprocessor,
    batch_size: int,
    cancel: threading.Event | None = None,
) -> Iterator[Batch]:
    """Yield batches of `entries` in order; stops early (without error) once `cancel` is set."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    slices = [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
    if not slices:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spurguard-decode") as pool:
        pending: Future[Batch] = pool.submit(_prepare, slices[0], backend)
        for next_slice in slices[1:] + [None]:
            if cancel is not None and cancel.is_set():
                return
            batch = pending.result()
            if next_slice is not None:
                pending = pool.submit(_prepare, next_slice, backend)
            yield batch


def iter_features(
    entries: Sequence[ImageEntry],
    backend: FeatureExtractor,
    batch_size: int,
    cancel: threading.Event | None = None,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, phi of its readable images [n, d]) for `entries` in order; decoding overlaps the forward."""
    for batch in iter_batches(entries, backend, batch_size, cancel):
        if batch.entries:
            yield batch, backend.features(backend.stack_crops(batch.crops))
        else:
            yield batch, torch.empty(0, backend.feature_dim)
