"""Batches of decoded, preprocessed images, prepared one batch ahead of the forward pass.

Decoding runs in a background thread so that it overlaps the model's forward pass (PIL releases
the GIL while it decodes and resizes). It stops at uint8 crops; the thread that runs the model
normalises them, so that no torch op competes with the forward pass for the cores. An unreadable
image is skipped and reported, not fatal: one corrupt file must not throw away an hour-long fit.
A file that `read` refuses (PermissionDenied: it leads out of the data roots) is fatal: someone
is changing the dataset under the server, which is not a corrupt file to shrug off.
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from spurguard.server.datasets import ImageEntry
from spurguard.server.errors import PermissionDenied, SpurguardError


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


Reader = Callable[[Path], bytes]  # a file's bytes, from a reader that checks where it is (DataRoots.read)


def _prepare(entries: Sequence[ImageEntry], backend: Preprocessor, read: Reader) -> Batch:
    good: list[ImageEntry] = []
    crops: list[np.ndarray] = []
    skipped: list[tuple[ImageEntry, str]] = []
    for entry in entries:
        try:
            crops.append(backend.decode_crop(read(entry.path)))
            good.append(entry)
        except PermissionDenied:
            raise
        except (OSError, SpurguardError) as error:
            skipped.append((entry, str(error)))
    return Batch(good, crops, skipped)


def iter_batches(
    entries: Sequence[ImageEntry],
    backend: Preprocessor,
    batch_size: int,
    cancel: threading.Event | None = None,
    *,
    read: Reader,
) -> Iterator[Batch]:
    """Yield batches of `entries` (each file's bytes from `read`) in order (none for no entries);
    stops early (without error) once `cancel` is set."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    slices = iter([entries[i : i + batch_size] for i in range(0, len(entries), batch_size)])
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spurguard-decode") as pool:

        def prepare_next() -> list[Future[Batch]]:  # none once the slices run out (or there were none)
            return [pool.submit(_prepare, piece, backend, read) for piece in itertools.islice(slices, 1)]

        ahead = prepare_next()
        while ahead:
            if cancel is not None and cancel.is_set():
                return
            batch = ahead[0].result()
            ahead = prepare_next()
            yield batch


def iter_features(
    entries: Sequence[ImageEntry],
    backend: FeatureExtractor,
    batch_size: int,
    cancel: threading.Event | None = None,
    *,
    read: Reader,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """(batch, phi of its readable images [n, d]) for `entries` in order; decoding overlaps the forward."""
    for batch in iter_batches(entries, backend, batch_size, cancel, read=read):
        if batch.entries:
            yield batch, backend.features(backend.stack_crops(batch.crops))
        else:
            yield batch, torch.empty(0, backend.feature_dim)
