"""Large work buffers of the neural PCA solve, reused from one class to the next.

Why: every class of a fit needs the same few large buffers (its kept rows, max_rows x d; its
Gram matrix, n x n; the Lanczos basis), and a freshly allocated buffer is paid again on first
touch, in page faults: 4-5 ms for the rows of a 1300-image class at d = 2048 and about 3 ms for
its Gram matrix, a tenth of the class's whole solve. A buffer handed back when a class is done
goes to the next class that asks for one at least as large, on the same device and dtype.
At most `KEPT` buffers wait here, so what is held stays a few classes' worth however many
classes a fit has; a buffer is only ever in one class's hands (`take` removes it from the pool).
"""
from __future__ import annotations

import math
import threading

import torch

KEPT = 6  # the rows, Gram, basis and projected buffers of one class, and room for a second worker


class Workspace:
    """A bounded pool of flat buffers; thread-safe (fit workers solve classes in parallel)."""

    def __init__(self, kept: int = KEPT) -> None:
        self._kept = kept
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape`: the smallest free buffer that holds it, else a new one."""
        numel = math.prod(shape)
        with self._lock:
            fitting = [i for i, b in enumerate(self._free)
                       if b.dtype == dtype and b.device == device and b.numel() >= numel]
            if fitting:
                buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
                return buffer[:numel].view(shape)
        return torch.empty(numel, dtype=dtype, device=device).view(shape)

    def give(self, tensor: torch.Tensor) -> None:
        """Hand back a tensor from `take` once nothing reads it any more; its whole buffer is reused."""
        flat = tensor._base if tensor._base is not None else tensor  # take's view -> the flat buffer
        if flat.ndim != 1 or not flat.is_contiguous():
            return  # not one of ours: leave it to the garbage collector
        with self._lock:
            if any(b is flat for b in self._free):
                return
            self._free.append(flat)
            del self._free[: max(0, len(self._free) - self._kept)]  # oldest first


WORKSPACE = Workspace()
