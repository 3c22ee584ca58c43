"""`spurguard export-triton`: a model's backbone as a Triton model repository (SPEC §3).

Triton runs the backbone only; preprocessing, the head and gradient work stay in spurguard. The
repository gets one model, REPO/<name>_backbone: version 1 holds model.onnx (platform
onnxruntime_onnx: the graph the ONNX runtimes use, or the one the model ships) or model.pt
(pytorch_libtorch: TorchScript; a torch.export backbone is traced), and config.pbtxt is a
tritonclient ModelConfig message printed by protobuf's text_format, so it is what Triton parses.
Before anything is moved into place the written model file is run here on seeded inputs at two
batch sizes and must give torch's features (runtimes.FEATURE_TOLERANCE).

With --model-dir DIR a spurguard model directory is written as well: the source directory's
files (a built-in built in code: its backbone as TorchScript, its head and class list) and a
model.toml whose [triton] section names the Triton model, so the same weights keep serving
Visualize locally; without it the section to add is printed. Each folder is written beside its
destination first and renamed into place: a polling Triton never sees half a model.
"""
from __future__ import annotations

import argparse
import json
import shutil
import secrets
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx
import safetensors.torch
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from spurguard.server.backends.argtypes import at_least_one
from spurguard.server.backends.builtins import load_model, model_name, source_directory
from spurguard.server.backends.device import CPU_BATCH_SIZE, GPU_BATCH_SIZE_SMALL
from spurguard.server.backends.modeldir import MODEL_TOML, ModelSpec, TritonSpec, model_toml_text, read_model_toml
from spurguard.server.backends.runtimes import (
    FEATURE_TOLERANCE,
    Forward,
    OnnxRuntimeForward,
    TorchForward,
    feature_deviation,
)
from spurguard.server.backends.torch_backend import TorchBackend
from spurguard.server.errors import FailedPrecondition, InvalidInput, SpurguardError, exception_line

PLATFORMS = ("onnxruntime_onnx", "pytorch_libtorch")
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "pytorch_libtorch": "model.pt"}
# The libtorch backend cannot read names from TorchScript: it binds <name>__<index> by position.
LIBTORCH_NAMES = ("INPUT__0", "OUTPUT__0")
KINDS = {"cpu": mc.ModelInstanceGroup.KIND_CPU, "gpu": mc.ModelInstanceGroup.KIND_GPU}
DEFAULT_BATCH = {"cpu": CPU_BATCH_SIZE, "gpu": GPU_BATCH_SIZE_SMALL}  # the GPU's memory is not known here
DEFAULT_URL = "127.0.0.1:8001"
# spurguard's own batcher already gathers a request's images into batches; Triton waits only
# this long to merge batches arriving together (from several replicas) into one forward pass.
MAX_QUEUE_DELAY_US = 1000


def triton_model_name(model: str) -> str:
    """The Triton model a spurguard model's backbone is exported as."""
    return f"{model}_backbone"


def build_config(
    *,
    name: str,
    platform: str,
    max_batch_size: int,
    input_name: str,
    output_name: str,
    input_size: int,
    feature_dim: int,
    instances: int,
    kind: str,
) -> mc.ModelConfig:
    """config.pbtxt as a message: float32 [N,3,S,S] in, [N,d] out, dynamic batching up to max_batch_size."""
    config = mc.ModelConfig(name=name, platform=platform, max_batch_size=max_batch_size)
    config.input.add(name=input_name, data_type=mc.TYPE_FP32, dims=[3, input_size, input_size])
    config.output.add(name=output_name, data_type=mc.TYPE_FP32, dims=[feature_dim])
    config.dynamic_batching.max_queue_delay_microseconds = MAX_QUEUE_DELAY_US
    config.instance_group.add(count=instances, kind=KINDS[kind])
    return config


def torchscript_backbone(backend: TorchBackend) -> torch.jit.ScriptModule:
    """The backbone as TorchScript: a TorchScript one as it is, any other traced at batch 2 on zeros."""
    if isinstance(backend.module, torch.jit.ScriptModule):
        return backend.module
    example = torch.zeros(2, 3, backend.input_size, backend.input_size, device=backend.torch_device)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings on every call
            # no check_trace: the written file is compared with torch at other batch sizes anyway
            return torch.jit.trace(backend.module, example, check_trace=False)
    except Exception as error:  # noqa: BLE001 - the tracer raises many error types for unsupported code
        raise InvalidInput(
            f"{backend.source}: the backbone cannot be traced to TorchScript ({exception_line(error)}); "
            "use --platform onnxruntime_onnx"
        ) from None


def onnx_io_names(path: Path) -> tuple[str, str]:
    """The graph's one input and one output, by name (the config must use the graph's own)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [value.name for value in graph.input if value.name not in initializers]
    outputs = [value.name for value in graph.output]
    if len(inputs) != 1 or len(outputs) != 1:
        raise InvalidInput(f"{path}: a backbone graph has one input and one output, found {inputs} and {outputs}")
    return inputs[0], outputs[0]


def _write_model_file(backend: TorchBackend, platform: str, path: Path) -> tuple[tuple[str, str], Forward]:
    """Write the backbone for `platform`; its input/output names and the file loaded back to run it."""
    cpu = torch.device("cpu")
    if platform == "pytorch_libtorch":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still what libtorch runs
            torchscript_backbone(backend).save(str(path))
            return LIBTORCH_NAMES, TorchForward(torch.jit.load(str(path), map_location=cpu), cpu)
    if backend.onnx is not None:
        shutil.copyfile(backend.onnx, path)
    else:
        backend.export_onnx(path)
    return onnx_io_names(path), OnnxRuntimeForward(path, cpu)


@contextmanager
def _staged(target: Path, force: bool) -> Iterator[Path]:
    """A new folder beside `target` that replaces it once written (a non-empty target only with `force`)."""
    if target.exists() and not target.is_dir():
        raise FailedPrecondition(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise FailedPrecondition(f"{target} exists and is not empty; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: that makes the folder 0700, unreadable to a Triton running as another user
    stage = target.parent / f".{target.name}.{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
        if target.exists():
            shutil.rmtree(target)
        stage.rename(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@dataclass(frozen=True)
class Tensor:
    """One input or output of the Triton model, dims without the batch axis."""

    name: str
    dims: list[int]


@dataclass(frozen=True)
class Export:
    """What export_triton wrote (the --json document)."""

    repository: str
    model: str  # the Triton model name
    platform: str
    max_batch_size: int
    instances: int
    kind: str
    input: Tensor
    output: Tensor
    deviation: float  # the model file's features against torch's, a share of the largest
    triton: TritonSpec  # the [triton] section that names it
    model_dir: str | None


def export_repository(
    backend: TorchBackend,
    repository: Path,
    *,
    platform: str = "onnxruntime_onnx",
    max_batch_size: int | None = None,
    instances: int = 1,
    kind: str = "cpu",
    force: bool = False,
) -> tuple[mc.ModelConfig, float]:
    """Write REPOSITORY/<name>_backbone (config.pbtxt, 1/model.*); its config and the model file's deviation."""
    if platform not in PLATFORMS:
        raise InvalidInput(f"platform {platform!r} is not one of {', '.join(PLATFORMS)}")
    if kind not in KINDS:
        raise InvalidInput(f"instance kind {kind!r} is not one of {', '.join(KINDS)}")
    if instances < 1 or (max_batch_size is not None and max_batch_size < 1):
        raise InvalidInput(f"instances ({instances}) and max_batch_size ({max_batch_size}) must be >= 1")
    name = triton_model_name(backend.name)
    with _staged(repository / name, force) as stage:
        version = stage / "1"
        version.mkdir()
        (input_name, output_name), forward = _write_model_file(backend, platform, version / MODEL_FILES[platform])
        deviation = feature_deviation(forward, TorchForward(backend.module, backend.torch_device), backend.input_size)
        if deviation > FEATURE_TOLERANCE:
            raise InvalidInput(
                f"{backend.source}: the exported {MODEL_FILES[platform]} gives features {deviation:.1e} (relative) "
                f"away from torch's, over the tolerance {FEATURE_TOLERANCE:.0e}"
            )
        config = build_config(
            name=name, platform=platform, max_batch_size=max_batch_size or DEFAULT_BATCH[kind],
            input_name=input_name, output_name=output_name, input_size=backend.input_size,
            feature_dim=backend.feature_dim, instances=instances, kind=kind,
        )
        (stage / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
    return config, deviation


def _rebased(spec: ModelSpec, root: Path) -> ModelSpec:
    """`spec` with its files under `root` at the same relative paths."""
    def move(path: Path | None) -> Path | None:
        return None if path is None else root / path.relative_to(spec.root)

    return replace(spec, root=root, backbone=move(spec.backbone), head=move(spec.head),
                   classes=move(spec.classes), onnx=move(spec.onnx))


def write_model_dir(model: str, backend: TorchBackend, target: Path, triton: TritonSpec, force: bool = False) -> None:
    """A model directory for `model` (a spec) whose model.toml carries `triton`: the source directory's
    files copied (their digest, and so the store's fits, stay the same), or for a built-in built in
    code its backbone traced to TorchScript, its head and its classes."""
    source = source_directory(model)
    with _staged(target, force) as stage:
        if source is not None:
            spec = read_model_toml(source)
            for path in (spec.backbone, spec.head, spec.classes, spec.onnx):
                if path is not None:
                    copy = stage / path.relative_to(spec.root)
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, copy)
            spec = _rebased(spec, stage)
        else:
            backbone, head, classes = stage / "backbone.pt", stage / "head.safetensors", stage / "classes.txt"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torchscript_backbone(backend).save(str(backbone))
            weight, bias = backend.head()
            safetensors.torch.save_file({"weight": weight, "bias": bias}, str(head))
            lines = [name if wnid is None else f"{wnid} {name}" for wnid, name in zip(backend.class_wnids, backend.class_names)]
            classes.write_text("\n".join(lines) + "\n", encoding="utf-8")
            spec = ModelSpec(root=stage, name=backend.name, backbone=backbone, head=head, classes=classes,
                             preprocess=backend.preprocess_config)
        (stage / MODEL_TOML).write_text(model_toml_text(replace(spec, triton=triton)), encoding="utf-8")


def export_triton(
    model: str,
    repository: Path,
    *,
    platform: str = "onnxruntime_onnx",
    max_batch_size: int | None = None,
    instances: int = 1,
    kind: str = "cpu",
    url: str = DEFAULT_URL,
    model_dir: Path | None = None,
    force: bool = False,
) -> Export:
    """The whole command: load `model` (a built-in name or a model directory) on the CPU, write the
    repository and, with `model_dir`, the model directory that names it. The name and `url` are
    checked before the (slow) load."""
    triton = TritonSpec(url=url, model=triton_model_name(model_name(model)))
    backend = load_model(model, device="cpu")
    if not isinstance(backend, TorchBackend):
        raise FailedPrecondition(f"model {model!r} has no local torch backbone to export")
    config, deviation = export_repository(
        backend, repository, platform=platform, max_batch_size=max_batch_size,
        instances=instances, kind=kind, force=force,
    )
    if model_dir is not None:
        write_model_dir(model, backend, model_dir, triton, force)
    return Export(
        repository=str(repository), model=config.name, platform=platform, max_batch_size=config.max_batch_size,
        instances=instances, kind=kind,
        input=Tensor(config.input[0].name, list(config.input[0].dims)),
        output=Tensor(config.output[0].name, list(config.output[0].dims)),
        deviation=deviation, triton=triton, model_dir=None if model_dir is None else str(model_dir),
    )


def _summary(done: Export) -> str:
    lines = [
        f"wrote {Path(done.repository) / done.model}: {done.platform}, max_batch_size {done.max_batch_size}, "
        f"{done.instances} x KIND_{done.kind.upper()}, dynamic batching",
        f"  input {done.input.name} FP32 {done.input.dims} -> output {done.output.name} FP32 {done.output.dims}; "
        f"features equal torch's (deviation {done.deviation:.1e})",
    ]
    section = f'[triton]\nurl = "{done.triton.url}"\nmodel = "{done.triton.model}"'
    if done.model_dir is not None:
        lines.append(f"wrote model directory {done.model_dir}; its {MODEL_TOML} names the Triton model:")
    else:
        lines.append(f"add this to the model's {MODEL_TOML} (or pass --model-dir DIR to write a model directory):")
    lines += ["  " + line for line in section.splitlines()]
    return "\n".join(lines)


def build_parser(prog: str = "spurguard export-triton") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write a Triton model repository for a model's backbone: REPO/<name>_backbone/config.pbtxt "
        "and 1/model.onnx or 1/model.pt. The model file is checked to give torch's features before it is "
        "moved into place. A model.toml [triton] section names the Triton model (printed, or written with "
        "--model-dir); spurguard keeps the head and runs Visualize on the local backbone.",
    )
    p.add_argument("--model", required=True, metavar="SPEC", help="a built-in model name or a model directory (as serve --model)")
    p.add_argument("--out", required=True, type=Path, metavar="REPO",
                   help="the model repository (created if missing; other models in it are left alone)")
    p.add_argument("--platform", choices=PLATFORMS, default="onnxruntime_onnx",
                   help="onnxruntime_onnx (model.onnx, the default) or pytorch_libtorch (TorchScript model.pt)")
    p.add_argument("--max-batch-size", type=at_least_one, metavar="N",
                   help=f"Triton's max_batch_size (default {CPU_BATCH_SIZE} for --kind cpu, {GPU_BATCH_SIZE_SMALL} for gpu)")
    p.add_argument("--instances", type=at_least_one, default=1, metavar="N", help="model instances (default 1)")
    p.add_argument("--kind", choices=sorted(KINDS), default="cpu", help="where the instances run (default cpu)")
    p.add_argument("--url", default=DEFAULT_URL, metavar="HOST:PORT",
                   help=f"Triton's gRPC endpoint, for the [triton] section (default {DEFAULT_URL})")
    p.add_argument("--model-dir", type=Path, metavar="DIR",
                   help="also write a spurguard model directory whose model.toml names the Triton model")
    p.add_argument("--force", action="store_true",
                   help="replace an existing REPO/<name>_backbone (and --model-dir DIR) instead of refusing")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON document on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    """`spurguard export-triton …`: 0 written, 1 the export failed (the reason on stderr), 2 usage."""
    args = build_parser().parse_args(argv)
    try:
        done = export_triton(
            args.model, args.out, platform=args.platform, max_batch_size=args.max_batch_size,
            instances=args.instances, kind=args.kind, url=args.url, model_dir=args.model_dir, force=args.force,
        )
    except SpurguardError as error:
        if args.json:
            print(json.dumps({"error": {"code": error.code, "message": str(error)}}), flush=True)
        print(f"spurguard export-triton: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(done), default=str) if args.json else _summary(done), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
