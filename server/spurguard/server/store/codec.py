"""ClassComponents <-> (safetensors bytes, JSON record): the only serialisation the store uses.

Why two parts: arrays go to safetensors (typed, mmap-able, no code execution on load); the
image ids and scalars go to JSON so people and tools can read them. The JSON record carries the
SHA-256 of the tensor bytes, so a mismatched or corrupted pair is detected on load instead of
silently scoring with the wrong components.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy

from spurguard.server.engine.components import ClassComponents
from spurguard.server.errors import FailedPrecondition, InvalidInput

FORMAT_VERSION = 1

# Tensor name -> dtype the ClassComponents contract fixes; inputs are cast (float32 -> float64
# is exact), so what is stored is exactly what a reader gets back.
_TENSOR_DTYPES = {
    "mean": np.float64,
    "eigenvalues": np.float64,
    "vectors": np.float64,
    "alphas": np.float32,
}


@dataclass(frozen=True)
class ClassSummary:
    """What a fit's manifest keeps per class, so listings and label checks read no tensors."""

    class_index: int
    count: int
    num_components: int
    tensors_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "class_index": self.class_index,
            "count": self.count,
            "num_components": self.num_components,
            "tensors_sha256": self.tensors_sha256,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ClassSummary:
        return cls(
            class_index=int(record["class_index"]),
            count=int(record["count"]),
            num_components=int(record["num_components"]),
            tensors_sha256=str(record["tensors_sha256"]),
        )


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _arrays(components: ClassComponents, feature_dim: int, max_components: int) -> dict[str, np.ndarray]:
    """Cast to the contract dtypes and check shapes, so nothing malformed is ever persisted."""
    k = components.class_index
    if not _is_int(k) or k < 0:
        raise InvalidInput(f"class_index must be a non-negative integer, got {k!r}")
    if not _is_int(components.count) or components.count < 0:
        raise InvalidInput(f"class {k}: count must be a non-negative integer, got {components.count!r}")
    if not isinstance(components.total_variance, (int, float, np.floating)) or not math.isfinite(
        components.total_variance
    ):
        raise InvalidInput(f"class {k}: total_variance must be a finite number")
    if not all(isinstance(i, str) for i in components.image_ids):
        raise InvalidInput(f"class {k}: image_ids must be strings")
    arrays = {}
    for name, dtype in _TENSOR_DTYPES.items():
        try:
            arrays[name] = np.ascontiguousarray(getattr(components, name), dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"class {k}: {name} is not a numeric array: {exc}") from None
        if not np.isfinite(arrays[name]).all():
            raise InvalidInput(f"class {k}: {name} has non-finite values")
    vectors, alphas = arrays["vectors"], arrays["alphas"]
    if vectors.ndim != 2:
        raise InvalidInput(f"class {k}: vectors must be [L, d], got shape {list(vectors.shape)}")
    num = vectors.shape[0]
    n_images = len(components.image_ids)
    expected = {
        "mean": (feature_dim,),
        "eigenvalues": (num,),
        "vectors": (num, feature_dim),
        # A class stored without fit-image alphas keeps the dataclass default [0, 0].
        "alphas": alphas.shape if alphas.size == 0 and n_images == 0 else (n_images, num),
    }
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise InvalidInput(
                f"class {k}: {name} has shape {list(arrays[name].shape)}, expected {list(shape)} "
                f"(feature dim {feature_dim}, {num} components, {n_images} image ids)"
            )
    if num > max_components:
        raise InvalidInput(f"class {k}: {num} components, but the fit keeps at most {max_components}")
    return arrays


def encode(
    components: ClassComponents, feature_dim: int, max_components: int
) -> tuple[bytes, dict[str, Any]]:
    """Validated safetensors bytes and the JSON record that describes and checksums them."""
    arrays = _arrays(components, feature_dim, max_components)
    data = safetensors.numpy.save(arrays)
    record = {
        "format": FORMAT_VERSION,
        "class_index": int(components.class_index),
        "count": int(components.count),
        "num_components": arrays["vectors"].shape[0],
        "feature_dim": feature_dim,
        "total_variance": float(components.total_variance),
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
        "tensors_bytes": len(data),
        "image_ids": list(components.image_ids),
    }
    return data, record


def decode(data: bytes, record: dict[str, Any], where: str) -> ClassComponents:
    """Rebuild a ClassComponents, refusing bytes that do not match the record's checksum."""
    if record.get("format") != FORMAT_VERSION:
        raise FailedPrecondition(f"{where}: unsupported store format {record.get('format')!r}")
    if hashlib.sha256(data).hexdigest() != record["tensors_sha256"]:
        raise FailedPrecondition(f"{where}: tensors do not match their checksum (corrupt store); run fit")
    tensors = safetensors.numpy.load(data)
    return ClassComponents(
        class_index=int(record["class_index"]),
        count=int(record["count"]),
        mean=tensors["mean"],
        eigenvalues=tensors["eigenvalues"],
        vectors=tensors["vectors"],
        total_variance=float(record["total_variance"]),
        image_ids=list(record["image_ids"]),
        alphas=tensors["alphas"],
    )
