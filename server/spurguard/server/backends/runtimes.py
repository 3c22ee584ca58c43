"""Where a backbone's forward pass runs: torch, ONNX Runtime or OpenVINO, and `auto`'s choice.

Fit, Score and Evaluate are forward passes plus cheap linear algebra, so their speed is the
backbone's; on CPUs ONNX Runtime runs the same graph several times faster than eager torch.
Every runtime here maps a float32 batch [N,3,S,S] to features [N,d] and must give torch's
features: `choose_runtime` checks that on seeded inputs before a runtime is used, `auto` then
times the ones that agree and keeps the fastest, and nothing runs in reduced precision unless
a caller asks (OpenVINO's default on bf16-capable CPUs is bf16: it is pinned to f32 here).
Gradient work (attacks, heatmaps) always stays on the torch module, with the same weights.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import torch

from spurguard.server.backends.device import available_cpus
from spurguard.server.errors import FailedPrecondition, InvalidInput, exception_line

log = logging.getLogger("spurguard.server")

RuntimeName = Literal["torch", "onnxruntime", "openvino"]  # the ones model.toml `runtime` may name
ForwardRuntime = Literal[RuntimeName, "triton"]  # "triton": model.toml [triton] (triton_forward.py)
RUNTIMES: tuple[RuntimeName, ...] = get_args(RuntimeName)
RUNTIME_CHOICES = ("auto", *RUNTIMES)
_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}  # runtime -> the package it needs
# Features of another runtime count as torch's when every entry is within this share of the
# largest torch feature: alphas (linear in the features) then agree to about the same relative
# error, well inside SPEC's 1e-4. Reduced precision (bf16: ~1e-2) is far outside it.
FEATURE_TOLERANCE = 1e-5
PROBE_BATCHES = (3, 1)  # odd sizes, different from each other: a graph with a fixed batch fails
TIMING_ROUNDS = 3


class Forward(Protocol):
    """A backbone's forward pass on one runtime."""

    runtime: ForwardRuntime
    batches_in_flight: int  # calls that may run at once (see Backend.batches_in_flight)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 [N,3,S,S] (C-contiguous) -> float32 features [N,d]."""
        ...


class TorchForward:
    """The torch module itself, in inference mode, on its device."""

    runtime: RuntimeName = "torch"
    batches_in_flight = 1

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(x).to(self.device)).float().cpu().numpy()


class OnnxRuntimeForward:
    """An ONNX Runtime session: all graph optimisations, this process's CPUs (threads that sleep
    between runs), CUDA when asked."""

    runtime: RuntimeName = "onnxruntime"
    batches_in_flight = 1

    def __init__(self, graph: Path, device: torch.device) -> None:
        import onnxruntime as ort  # an optional package: imported only when this runtime is used

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = available_cpus()
        options.inter_op_num_threads = 1
        # Its threads would otherwise spin between runs, on the cores that decode the next batch
        # meanwhile (a decode + forward loop on 2 cores: ~190 images/s spinning, ~215 not); the
        # forward alone is as fast either way at batch sizes worth serving.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: its warnings would go to stderr on every load
        providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            available = ort.get_available_providers()
            gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            if not gpu:
                raise FailedPrecondition(
                    "onnxruntime has no CUDA execution provider here; install onnxruntime-gpu or use --runtime torch"
                )
            providers = [(p, {"device_id": str(device.index or 0)}) for p in gpu] + providers
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own error types for bad graphs
            raise InvalidInput(f"{graph}: ONNX Runtime cannot load it: {exception_line(error)}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoForward:
    """An OpenVINO model compiled for the CPU in f32, one stream using this process's CPUs."""

    runtime: RuntimeName = "openvino"
    batches_in_flight = 1

    def __init__(self, graph: Path, device: torch.device) -> None:
        import openvino  # an optional package: imported only when this runtime is used

        if device.type != "cpu":
            raise FailedPrecondition("spurguard runs OpenVINO on the CPU only; use --runtime onnxruntime or torch")
        config = {
            "INFERENCE_PRECISION_HINT": "f32",  # never bf16 silently: it is off by ~1e-2
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": available_cpus(),
        }
        try:
            self.compiled = openvino.Core().compile_model(str(graph), "CPU", config)
        except Exception as error:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise InvalidInput(f"{graph}: OpenVINO cannot load it: {exception_line(error)}") from None
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[0], copy=True)  # the request reuses its buffer


_OPENERS: dict[RuntimeName, Callable[[Path, torch.device], Forward]] = {
    "onnxruntime": OnnxRuntimeForward,
    "openvino": OpenVinoForward,
}


def installed_runtimes() -> list[RuntimeName]:
    """The runtimes this environment can run (torch always)."""
    return [name for name in RUNTIMES if name == "torch" or importlib.util.find_spec(_MODULES[name]) is not None]


@dataclass(frozen=True)
class RuntimeTrial:
    """How one runtime did at load: its features' largest deviation from torch's (a share of the
    largest torch feature), whether that is within FEATURE_TOLERANCE, and its images/s."""

    runtime: ForwardRuntime
    deviation: float
    equal: bool
    images_per_s: float | None  # None: not timed (features differ, or only one candidate)
    error: str | None = None  # it could not run at all


@dataclass(frozen=True)
class RuntimeChoice:
    forward: Forward
    trials: tuple[RuntimeTrial, ...]

    def describe(self) -> str:
        """One log line: what was tried and what runs."""
        def trial(t: RuntimeTrial) -> str:
            if t.error is not None:
                return f"{t.runtime}: {t.error}"
            speed = "" if t.images_per_s is None else f", {t.images_per_s:.1f} img/s"
            return f"{t.runtime}: deviation {t.deviation:.1e}{'' if t.equal else ' (not equal)'}{speed}"

        return f"forward on {self.forward.runtime} ({'; '.join(trial(t) for t in self.trials)})"


def probe_inputs(size: int, batch: int, seed: int = 0) -> np.ndarray:
    """Seeded inputs in the range of normalised images (pixels in [0, 1], roughly standardised)."""
    generator = np.random.default_rng(seed)
    return ((generator.random((batch, 3, size, size), dtype=np.float32) - 0.5) * 4.0).astype(np.float32)


def feature_deviation(forward: Forward, reference: TorchForward, size: int) -> float:
    """The largest deviation of `forward`'s features from torch's on seeded inputs at PROBE_BATCHES,
    as a share of the largest torch feature (equal: <= FEATURE_TOLERANCE)."""
    worst = 0.0
    for seed, batch in enumerate(PROBE_BATCHES):
        x = probe_inputs(size, batch, seed)
        want, got = reference(x), forward(x)
        if got.shape != want.shape:
            raise InvalidInput(f"its features are {list(got.shape)} for a batch of {batch}, torch's {list(want.shape)}")
        scale = max(float(np.abs(want).max()), 1e-12)
        worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()) / scale)
    return worst


def require_equal(trial: RuntimeTrial, source: str, remedy: str) -> None:
    """A runtime that must be used (asked for by name, or the only one the model allows) and does
    not give torch's features is a load error, never a silent fallback."""
    if not trial.equal:
        raise InvalidInput(
            f"{source}: runtime {trial.runtime} gives features {trial.deviation:.1e} (relative) away from "
            f"torch's, over the tolerance {FEATURE_TOLERANCE:.0e}; {remedy}"
        )


def _images_per_s(forward: Forward, size: int, batch: int) -> float:
    x = probe_inputs(size, batch, seed=len(PROBE_BATCHES))
    forward(x)  # the first run allocates and picks kernels
    best = float("inf")
    for _ in range(TIMING_ROUNDS):
        started = time.perf_counter()
        forward(x)
        best = min(best, time.perf_counter() - started)
    return batch / best


def choose_runtime(
    requested: str,
    reference: TorchForward,
    graph: Callable[[], Path],
    *,
    input_size: int,
    batch_size: int,
    device: torch.device,
    source: str,
    strict: bool = False,
) -> RuntimeChoice:
    """The forward pass to use: `requested` if it gives torch's features (else a clear error),
    or for "auto" the fastest installed runtime that does. `graph` gives the ONNX file, exported
    and cached on first use; it is not called when only torch is tried. With `strict` (a graph
    the model ships) a runtime that cannot load it or disagrees with torch is an error for
    "auto" too, not a reason to leave it out."""
    if requested not in RUNTIME_CHOICES:
        raise InvalidInput(f"{source}: runtime {requested!r} is not one of {', '.join(RUNTIME_CHOICES)}")
    if requested != "auto" and requested not in installed_runtimes():
        raise FailedPrecondition(
            f"{source}: runtime {requested} is not installed here (pip install {_MODULES[requested]})"
        )
    names = [requested] if requested != "auto" else installed_runtimes()
    if device.type != "cpu" and requested == "auto":
        names = [name for name in names if name != "openvino"]
    trials: list[RuntimeTrial] = []
    candidates: list[tuple[Forward, RuntimeTrial]] = []
    for name in names:
        if name == "torch":
            forward: Forward = reference
            trial = RuntimeTrial("torch", 0.0, True, None)
        else:
            try:
                forward = _OPENERS[name](graph(), device)
                deviation = feature_deviation(forward, reference, input_size)
            except (InvalidInput, FailedPrecondition) as error:
                if requested != "auto" or (strict and isinstance(error, InvalidInput)):
                    raise InvalidInput(f"{source}: runtime {name}: {error}") from None
                trials.append(RuntimeTrial(name, float("nan"), False, None, str(error)))
                continue
            trial = RuntimeTrial(name, deviation, deviation <= FEATURE_TOLERANCE, None)
            if requested != "auto" or strict:
                require_equal(trial, source, "use runtime torch or fix the ONNX graph")
        if trial.equal:
            candidates.append((forward, trial))
        else:
            trials.append(trial)
    if len(candidates) > 1:  # only auto gets here: time the ones that agree
        candidates = [
            (forward, RuntimeTrial(t.runtime, t.deviation, True, _images_per_s(forward, input_size, batch_size)))
            for forward, t in candidates
        ]
    trials.extend(t for _, t in candidates)
    forward, _ = max(candidates, key=lambda pair: pair[1].images_per_s or 0.0)
    return RuntimeChoice(forward, tuple(sorted(trials, key=lambda t: RUNTIMES.index(t.runtime))))
