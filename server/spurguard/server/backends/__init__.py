"""Model backends: one protocol (preprocess -> features -> head), models from directories or built-ins."""
from spurguard.server.backends.base import (
    DEFAULT_LIMITS,
    Backend,
    GradientBackend,
    ImageInput,
    ImageLimits,
    PreprocessConfig,
)
from spurguard.server.backends.builtins import builtin_names, load_model, register_builtin
from spurguard.server.backends.device import resolve_device
from spurguard.server.backends.images import (
    decode_image,
    denormalize,
    encode_png,
    load_rgb,
    preprocess_images,
)
from spurguard.server.backends.modeldir import ModelSpec, TritonSpec, load_model_dir, read_model_toml
from spurguard.server.backends.torch_backend import TorchBackend

__all__ = [
    "DEFAULT_LIMITS",
    "Backend",
    "GradientBackend",
    "ImageInput",
    "ImageLimits",
    "ModelSpec",
    "PreprocessConfig",
    "TorchBackend",
    "TritonSpec",
    "builtin_names",
    "decode_image",
    "denormalize",
    "encode_png",
    "load_model",
    "load_model_dir",
    "load_rgb",
    "preprocess_images",
    "read_model_toml",
    "register_builtin",
    "resolve_device",
]
