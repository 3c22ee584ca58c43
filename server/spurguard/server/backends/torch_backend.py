"""In-process torch backend: a backbone module (TorchScript, torch.export or eager) plus a linear head.

Its forward-only work (`features`) runs on the runtime `select_runtime` picks (torch, ONNX
Runtime or OpenVINO, see runtimes.py) or, for a model.toml with [triton], on that Triton server
(triton_forward.py); gradient work always runs on the torch module.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spurguard.server.backends.base import DEFAULT_LIMITS, ImageInput, ImageLimits, PreprocessConfig
from spurguard.server.backends.device import configure_cpu_threads, default_batch_size, resolve_device
from spurguard.server.backends.images import OpenedImage, decode_crop, open_image, preprocess_images, stack_crops
from spurguard.server.backends.onnx_export import export_onnx
from spurguard.server.backends.runtimes import (
    FEATURE_TOLERANCE,
    Forward,
    ForwardRuntime,
    RuntimeChoice,
    RuntimeTrial,
    TorchForward,
    choose_runtime,
    feature_deviation,
    require_equal,
)
from spurguard.server.errors import InvalidInput, ResourceExhausted, exception_line

if TYPE_CHECKING:  # modeldir imports this module
    from spurguard.server.backends.modeldir import TritonSpec

log = logging.getLogger("spurguard.server")


def _freeze(module: torch.nn.Module) -> None:
    """Eval mode and no parameter gradients: attacks differentiate w.r.t. the input only."""
    try:
        module.eval()
    except NotImplementedError:
        pass  # torch.export modules keep the mode they were exported in and refuse eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)


class TorchBackend:
    """A classifier logits = W · backbone(x) + b run by torch on the CPU or one GPU.

    The head stays a separate pair of tensors (not part of the module) because the method works
    on the backbone's features and the head's rows directly.
    """

    kind = "torch"

    def __init__(
        self,
        *,
        name: str,
        digest: str,
        backbone: torch.nn.Module | torch.export.ExportedProgram,
        weight: torch.Tensor,
        bias: torch.Tensor,
        preprocess_config: PreprocessConfig,
        class_names: Sequence[str] | None = None,
        class_wnids: Sequence[str | None] | None = None,
        device: str = "auto",
        max_batch_size: int | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
        source: str | None = None,
        runtime: str = "auto",
        onnx: Path | None = None,
        triton: TritonSpec | None = None,
    ) -> None:
        """`source` names where the model came from (a file, a built-in) in load errors;
        `runtime` is the model's preferred forward runtime, `onnx` a graph of the backbone it
        ships and `triton` the Triton model that runs it, all used by `select_runtime` (until
        then the forward runs on torch)."""
        source = source or name
        self.source = source
        self.preferred_runtime = runtime
        self.onnx = onnx
        self.triton = triton
        self.torch_device = resolve_device(device)
        if self.torch_device.type == "cpu":
            configure_cpu_threads()
        self.name = name
        self.digest = digest
        self.device = str(self.torch_device)
        self.preprocess_config = preprocess_config
        self.input_size = preprocess_config.size
        self.limits = limits
        if max_batch_size is None:
            max_batch_size = default_batch_size(self.torch_device)
        self.max_batch_size = max_batch_size
        if self.max_batch_size <= 0:
            raise InvalidInput(f"{source}: max_batch_size must be positive, got {self.max_batch_size}")

        if weight.ndim != 2 or bias.ndim != 1 or bias.shape[0] != weight.shape[0]:
            raise InvalidInput(
                f"{source}: head weight must be [C,d] and bias [C], "
                f"got {list(weight.shape)} and {list(bias.shape)}"
            )
        self.num_classes, head_dim = weight.shape
        self._weight = weight.detach().to("cpu", torch.float32).contiguous()
        self._bias = bias.detach().to("cpu", torch.float32).contiguous()
        self._head_on_device = (self._weight.to(self.torch_device), self._bias.to(self.torch_device))

        if isinstance(backbone, torch.export.ExportedProgram):
            self.export_source: torch.nn.Module | torch.export.ExportedProgram = backbone
            self.module = backbone.module()
        else:
            self.module = self.export_source = backbone.to(self.torch_device)
        _freeze(self.module)
        self.forward: Forward = TorchForward(self.module, self.torch_device)
        self.feature_dim = self._probe_feature_dim(source)
        if self.feature_dim != head_dim:
            raise InvalidInput(
                f"{source}: backbone gives {self.feature_dim}-d features but the head expects d = {head_dim}"
            )

        # Without a class list, classes are named by index (which dataset folders accept too).
        self.class_names = [str(i) for i in range(self.num_classes)] if class_names is None else list(class_names)
        self.class_wnids = [None] * self.num_classes if class_wnids is None else list(class_wnids)
        if len(self.class_names) != self.num_classes or len(self.class_wnids) != self.num_classes:
            raise InvalidInput(
                f"{source}: {len(self.class_names)} class names for a head with {self.num_classes} classes"
            )

    def _probe_feature_dim(self, source: str) -> int:
        """Run the backbone on zeros at batch 2 and 1: catches wrong output shapes and fixed batch sizes."""
        size = self.input_size
        for batch in (2, 1):
            try:
                with torch.inference_mode():
                    out = self.module(torch.zeros(batch, 3, size, size, device=self.torch_device))
            except Exception as error:  # noqa: BLE001 - any failure of a user's module is a bad model
                raise InvalidInput(
                    f"{source}: backbone fails on a [{batch},3,{size},{size}] input: {exception_line(error)}"
                ) from None
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
                shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InvalidInput(
                    f"{source}: backbone must return features [N,d], got {shape} for N={batch}"
                )
            if not out.is_floating_point():
                raise InvalidInput(
                    f"{source}: backbone returns {out.dtype} features, expected floating point"
                )
        return int(out.shape[1])

    def _check_input(self, x: torch.Tensor) -> None:
        size = self.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise InvalidInput(f"model {self.name} expects input [N,3,{size},{size}], got {list(x.shape)}")

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images to float32 [N,3,size,size] on the CPU, per the model's preprocessing."""
        return preprocess_images(images, self.preprocess_config, self.limits)

    def decode_crop(self, image: ImageInput) -> np.ndarray:
        """One image to its uint8 [size,size,3] crop; torch-free, for decode threads."""
        return decode_crop(image, self.preprocess_config, self.limits)

    def open_image(self, image: ImageInput) -> OpenedImage:
        """decode_crop's first step: the header, checked, and what decoding it will cost."""
        return open_image(image, self.limits, self.preprocess_config.resize)

    def stack_crops(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 crops to the normalised float32 input batch [N,3,size,size]."""
        return stack_crops(crops, self.preprocess_config)

    @property
    def runtime(self) -> ForwardRuntime:
        """Where `features` runs: "torch", "onnxruntime", "openvino" or "triton"."""
        return self.forward.runtime

    @property
    def batches_in_flight(self) -> int:
        return self.forward.batches_in_flight

    def select_runtime(self, requested: str | None, graph: Callable[[], Path]) -> RuntimeChoice:
        """Run `features` on `requested` (None: the model's preferred runtime; "auto": the fastest
        installed one that gives torch's features). `graph` gives the exported ONNX backbone; a
        model that ships its own graph uses that, and any problem with it is an error, never a
        silent fallback to torch. A model with [triton] runs there whatever is requested: its
        model.toml says where its backbone is served."""
        if self.triton is not None:
            return self._select_triton(requested)
        user_graph = self.onnx
        choice = choose_runtime(
            requested or self.preferred_runtime,
            TorchForward(self.module, self.torch_device),
            graph if user_graph is None else lambda: user_graph,
            input_size=self.input_size,
            batch_size=self.max_batch_size,
            device=self.torch_device,
            source=self.source,
            strict=user_graph is not None,
        )
        self.forward = choice.forward
        return choice

    def _select_triton(self, requested: str | None) -> RuntimeChoice:
        """Forward on the [triton] model, once its features equal the local module's; `device`
        then names the Triton URL (gradient work stays on `torch_device`)."""
        from spurguard.server.backends.triton_forward import TritonForward  # tritonclient only when used

        assert self.triton is not None
        if requested not in (None, "auto", "triton"):
            log.info("model %s: runtime %s not used: its [triton] section runs the backbone", self.name, requested)
        forward = TritonForward(self.triton, input_size=self.input_size, feature_dim=self.feature_dim)
        deviation = feature_deviation(forward, TorchForward(self.module, self.torch_device), self.input_size)
        trial = RuntimeTrial("triton", deviation, deviation <= FEATURE_TOLERANCE, None)
        require_equal(trial, f"{self.source} ({forward.where})", "serve the same weights as the model's backbone")
        self.forward = forward
        self.device = forward.url
        return RuntimeChoice(forward, (trial,))

    def export_onnx(self, path: Path) -> None:
        """Write the backbone to `path` as ONNX (a dynamic batch axis)."""
        export_onnx(self.export_source, path, self.input_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) as float32 [N,d] on the CPU, in chunks of max_batch_size, without autograd."""
        self._check_input(x)
        if x.shape[0] == 0:
            return torch.empty(0, self.feature_dim)
        try:
            array = x.to("cpu", torch.float32).contiguous().numpy()
            chunks = [
                torch.from_numpy(self.forward(array[start : start + self.max_batch_size]))
                for start in range(0, array.shape[0], self.max_batch_size)
            ]
        except torch.OutOfMemoryError:
            raise ResourceExhausted(
                f"model {self.name}: a batch of {self.max_batch_size} does not fit on {self.device}; "
                "lower max_batch_size"
            ) from None
        return torch.cat(chunks)

    def features_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) [N,d] on the backend's device, differentiable w.r.t. `x` (one forward, no chunking)."""
        self._check_input(x)
        return self.module(x.to(self.torch_device, torch.float32)).float()

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [C,d], b [C]) float32 on the CPU; callers must not modify them in place."""
        return self._weight, self._bias

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """W · phi + b on the features' device (the head is cached there for the backend's device)."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise InvalidInput(
                f"model {self.name} expects features [N,{self.feature_dim}], got {list(features.shape)}"
            )
        if features.device == self._head_on_device[0].device:
            weight, bias = self._head_on_device
        else:
            weight, bias = self._weight.to(features.device), self._bias.to(features.device)
        return F.linear(features.float(), weight, bias)

    def warm_up(self, batch_size: int | None = None) -> float:
        """One full forward pass (allocations, kernel selection) before the model reports ready."""
        start = time.perf_counter()
        self.features(torch.zeros(batch_size or self.max_batch_size, 3, self.input_size, self.input_size))
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
        return time.perf_counter() - start

    def __repr__(self) -> str:
        return (
            f"TorchBackend(name={self.name!r}, device={self.device!r}, classes={self.num_classes}, "
            f"feature_dim={self.feature_dim}, input_size={self.input_size}, digest={self.digest[:12]})"
        )
