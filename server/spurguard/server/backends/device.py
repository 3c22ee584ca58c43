"""Where a backend runs: device strings, default batch sizes, CPU thread count.

Kept apart from the backend so that the CLI can validate `--device` before loading anything.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from spurguard.server.errors import FailedPrecondition, InvalidInput

CPU_BATCH_SIZE = 32
# A forward-only pass at 224² keeps well under 10 GiB at these sizes even for ResNet-50-class
# backbones; bigger cards get the bigger batch because GPU throughput keeps rising up to it.
GPU_BATCH_SIZE_SMALL = 64
GPU_BATCH_SIZE_LARGE = 256
_LARGE_GPU_BYTES = 24 * 2**30

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N', checked against this machine."""
    match = _DEVICE_RE.match(spec.strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise InvalidInput(f"device {spec!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if kind == "auto":
        return torch.device("cuda", torch.cuda.current_device())
    if not torch.cuda.is_available():
        raise FailedPrecondition(f"device {spec!r} requested but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    n = int(index) if index is not None else torch.cuda.current_device()
    if n >= count:
        raise InvalidInput(f"device {spec!r} requested but this machine has {count} CUDA device(s)")
    return torch.device("cuda", n)


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass: small on CPU (latency grows linearly), large on big GPUs."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    total = torch.cuda.get_device_properties(device).total_memory
    return GPU_BATCH_SIZE_LARGE if total >= _LARGE_GPU_BYTES else GPU_BATCH_SIZE_SMALL


def available_cpus() -> int:
    """CPUs this process may really use: the affinity mask, capped by a cgroup v2 CPU quota.

    torch sizes its pool from the host's cores, which oversubscribes a container limited by a
    quota (e.g. `docker --cpus 2` on a 64-core host) and makes inference several times slower.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return cpus
    if quota == "max":
        return cpus
    return max(1, min(cpus, int(quota) // int(period)))


def configure_cpu_threads() -> None:
    """Lower torch's intra-op threads to the CPUs available, unless the user chose a count.

    An explicit OMP_NUM_THREADS / MKL_NUM_THREADS is respected, and the count is never raised:
    a caller that already called torch.set_num_threads() lower keeps it.
    """
    if "OMP_NUM_THREADS" in os.environ or "MKL_NUM_THREADS" in os.environ:
        return
    cpus = available_cpus()
    if torch.get_num_threads() > cpus:
        torch.set_num_threads(cpus)
