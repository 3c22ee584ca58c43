"""A user's model directory (SPEC §2): model.toml, a backbone, a safetensors head, optional classes.

Nothing here unpickles: TorchScript archives load through torch.jit's own restricted reader,
torch.export archives are refused when they carry pickled entries or compiled code, and the head
is safetensors. Every problem is an InvalidInput that names the file and key at fault.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import tomllib
import torch
from torch.export.passes import move_to_device_pass

from spurguard.server.backends.base import (
    DEFAULT_LIMITS,
    INTERPOLATIONS,
    ImageLimits,
    PreprocessConfig,
)
from spurguard.server.backends.device import resolve_device
from spurguard.server.backends.runtimes import RUNTIME_CHOICES
from spurguard.server.backends.torch_backend import TorchBackend
from spurguard.server.errors import InvalidInput, NotFound, exception_line

MODEL_TOML = "model.toml"
_TOP_KEYS = {"name", "backbone", "head", "classes", "preprocess", "runtime", "onnx", "triton"}
_PREPROCESS_KEYS = {"size", "resize", "interpolation", "mean", "std"}
_TRITON_KEYS = {"url", "model"}
_TRITON_TLS_KEYS = ("root_certificates", "private_key", "certificate_chain")  # PEM files, grpcs:// only
_HOST_PORT_RE = re.compile(r"^[^\s/]+:(\d{1,5})$")
_TLS_SCHEME, _PLAIN_SCHEME = "grpcs://", "grpc://"
# Model names end up in store paths, health-check service names and metric labels.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WNID_RE = re.compile(r"^n\d{8}$")
_HEAD_KEYS = {"weight", "bias"}

# What a torch.export.save archive may hold (paths below its top folder). Anything else, such
# as AOTInductor shared libraries or legacy pickled weights, is refused.
_PT2_ALLOWED = ("archive_format", "archive_version", "byteorder", ".data/", "models/", "extra/",
                "data/weights/", "data/constants/", "data/sample_inputs/")
_PT2_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")


@dataclass(frozen=True)
class TritonSpec:
    """model.toml's [triton] table: the Triton server and model that run the backbone.

    `url` is Triton's gRPC endpoint, HOST:PORT (or grpc://HOST:PORT) in plaintext and
    grpcs://HOST:PORT over TLS, as gRPC URIs spell it. With TLS, `root_certificates` is the CA
    that signed Triton's certificate (default: the system's), and `private_key` with
    `certificate_chain` are this client's own for mutual TLS.
    """

    url: str
    model: str
    root_certificates: Path | None = None
    private_key: Path | None = None
    certificate_chain: Path | None = None

    def __post_init__(self) -> None:
        match = _HOST_PORT_RE.match(self.address)
        if match is None or not 0 < int(match.group(1)) < 65536:
            raise InvalidInput(
                f"'triton.url' {self.url!r} must be HOST:PORT, grpc://HOST:PORT or grpcs://HOST:PORT (TLS), "
                "Triton's gRPC endpoint"
            )
        if not _NAME_RE.match(self.model):  # a folder of the model repository
            raise InvalidInput(f"'triton.model' {self.model!r} must be 1-128 letters, digits, '.', '_' or '-'")
        given = [key for key in _TRITON_TLS_KEYS if getattr(self, key) is not None]
        if given and not self.tls:
            raise InvalidInput(f"'triton.{given[0]}' needs TLS: write the url as grpcs://{self.address}")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise InvalidInput("give both 'triton.private_key' and 'triton.certificate_chain' (mutual TLS), or neither")

    @property
    def tls(self) -> bool:
        return self.url.startswith(_TLS_SCHEME)

    @property
    def address(self) -> str:
        """HOST:PORT without the scheme."""
        return self.url.removeprefix(_TLS_SCHEME).removeprefix(_PLAIN_SCHEME)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed, validated model.toml with its file paths resolved against the directory."""

    root: Path
    name: str
    backbone: Path
    head: Path
    classes: Path | None
    preprocess: PreprocessConfig
    runtime: str = "auto"  # where forward-only work runs (runtimes.RUNTIME_CHOICES)
    onnx: Path | None = None  # the backbone as ONNX, when the model ships one
    triton: TritonSpec | None = None  # the backbone's forward runs there (TorchBackend.select_runtime)


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    # bool is an int in Python, never a valid size or mean here
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidInput(f"{where}: {what}, got {type(value).__name__} {value!r}")
    return value


def _rgb_triple(value: Any, where: str, key: str) -> tuple[float, float, float]:
    what = f"'{key}' must be a list of 3 numbers"
    _expect(value, list, where, what)
    if len(value) != 3:
        raise InvalidInput(f"{where}: {what}, got {len(value)} values")
    return tuple(float(_expect(v, (int, float), where, what)) for v in value)  # type: ignore[return-value]


def _parse_preprocess(table: Any, where: str) -> PreprocessConfig:
    _expect(table, dict, where, "'preprocess' must be a table ([preprocess])")
    unknown = sorted(set(table) - _PREPROCESS_KEYS)
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) in [preprocess]: {', '.join(unknown)}")
    for key in ("size", "mean", "std"):
        if key not in table:
            raise InvalidInput(f"{where}: missing required key 'preprocess.{key}'")
    size = _expect(table["size"], int, where, "'preprocess.size' must be an integer")
    resize = _expect(table.get("resize", size), int, where, "'preprocess.resize' must be an integer")
    interpolation = _expect(
        table.get("interpolation", "bilinear"),
        str,
        where,
        f"'preprocess.interpolation' must be one of {INTERPOLATIONS}",
    )
    try:
        return PreprocessConfig(
            size=size,
            resize=resize,
            interpolation=interpolation,  # type: ignore[arg-type]
            mean=_rgb_triple(table["mean"], where, "preprocess.mean"),
            std=_rgb_triple(table["std"], where, "preprocess.std"),
        )
    except InvalidInput as error:
        raise InvalidInput(f"{where}: {error}") from None


def _parse_triton(table: Any, root: Path, where: str) -> TritonSpec:
    _expect(table, dict, where, "'triton' must be a table ([triton])")
    unknown = sorted(set(table) - _TRITON_KEYS - set(_TRITON_TLS_KEYS))
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) in [triton]: {', '.join(unknown)}")
    for key in sorted(_TRITON_KEYS):
        if key not in table:
            raise InvalidInput(f"{where}: missing required key 'triton.{key}'")
    url = _expect(table["url"], str, where, "'triton.url' must be a string HOST:PORT")
    model = _expect(table["model"], str, where, "'triton.model' must be a string")
    pem = {key: _model_file(root, table[key], where, f"triton.{key}") for key in _TRITON_TLS_KEYS if key in table}
    try:
        return TritonSpec(url=url, model=model, **pem)
    except InvalidInput as error:
        raise InvalidInput(f"{where}: {error}") from None


def _model_file(root: Path, value: Any, where: str, key: str) -> Path:
    relative = _expect(value, str, where, f"'{key}' must be a file name (string)")
    path = root / relative
    if not path.is_file():
        raise InvalidInput(f"{where}: '{key}' file {relative!r} does not exist in {root}")
    return path


def read_model_toml(root: str | Path) -> ModelSpec:
    """Parse and validate ROOT/model.toml; the files it names must exist (not yet loaded)."""
    root = Path(root)
    toml_path = root / MODEL_TOML
    where = str(toml_path)
    if not toml_path.is_file():
        raise NotFound(f"{root} is not a model directory: {MODEL_TOML} not found")
    try:
        table = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"{where}: not valid TOML: {exception_line(error)}") from None
    unknown = sorted(set(table) - _TOP_KEYS)
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s): {', '.join(unknown)}")
    for key in ("name", "backbone", "head", "preprocess"):
        if key not in table:
            raise InvalidInput(f"{where}: missing required key '{key}'")
    name = _expect(table["name"], str, where, "'name' must be a string")
    if not _NAME_RE.match(name):
        raise InvalidInput(f"{where}: 'name' {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    runtime = _expect(table.get("runtime", "auto"), str, where, f"'runtime' must be one of {RUNTIME_CHOICES}")
    if runtime not in RUNTIME_CHOICES:
        raise InvalidInput(f"{where}: 'runtime' {runtime!r} must be one of {', '.join(RUNTIME_CHOICES)}")
    return ModelSpec(
        root=root,
        name=name,
        backbone=_model_file(root, table["backbone"], where, "backbone"),
        head=_model_file(root, table["head"], where, "head"),
        classes=_model_file(root, table["classes"], where, "classes") if "classes" in table else None,
        preprocess=_parse_preprocess(table["preprocess"], where),
        runtime=runtime,
        onnx=_model_file(root, table["onnx"], where, "onnx") if "onnx" in table else None,
        triton=_parse_triton(table["triton"], root, where) if "triton" in table else None,
    )


def model_toml_text(spec: ModelSpec) -> str:
    """The model.toml that read_model_toml reads back as `spec` (files named relative to spec.root),
    for writing a model directory. json.dumps writes the values: JSON strings, numbers and lists
    of them are valid TOML."""
    def entries(table: dict[str, Any]) -> list[str]:
        return [f"{key} = {json.dumps(value)}" for key, value in table.items() if value is not None]

    def relative(path: Path | None) -> str | None:
        return None if path is None else path.relative_to(spec.root).as_posix()

    lines = entries({
        "name": spec.name,
        "backbone": relative(spec.backbone),
        "head": relative(spec.head),
        "classes": relative(spec.classes),
        "runtime": spec.runtime,
        "onnx": relative(spec.onnx),
    })
    triton = None if spec.triton is None else {
        **asdict(spec.triton), **{key: relative(getattr(spec.triton, key)) for key in _TRITON_TLS_KEYS}
    }
    tables = {"preprocess": asdict(spec.preprocess), "triton": triton}
    for key, table in tables.items():
        if table is not None:
            lines += ["", f"[{key}]", *entries(table)]
    return "\n".join(lines) + "\n"


def read_classes(path: Path) -> list[tuple[str | None, str]]:
    """classes.txt lines as (wnid or None, name); a leading ImageNet wnid ("n01440764 tench") is split off."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"{path}: cannot read class names: {exception_line(error)}") from None
    classes: list[tuple[str | None, str]] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            raise InvalidInput(f"{path}: line {number} is empty; every line names one class")
        first, _, rest = text.partition(" ")
        if _WNID_RE.match(first):
            classes.append((first, rest.strip() or first))
        else:
            classes.append((None, text))
    return classes


def _check_pt2_archive(path: Path) -> None:
    """Refuse a torch.export archive that would unpickle or load native code in torch.export.load."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1 or any("/" not in n for n in names):
                raise InvalidInput(f"{path}: not a torch.export archive (expected one top-level folder)")
            inner = {n: n.split("/", 1)[1] for n in names}
            if "archive_format" not in inner.values():
                raise InvalidInput(f"{path}: not a torch.export.save archive (no archive_format)")
            for name, rel in inner.items():
                if not rel.startswith(_PT2_ALLOWED) or ".." in rel.split("/"):
                    raise InvalidInput(
                        f"{path}: refusing torch.export archive entry {rel!r} (only graphs and weights load)"
                    )
                if not rel.startswith(("data/weights/", "data/constants/")):
                    continue
                if rel.endswith(".pt"):
                    raise InvalidInput(f"{path}: legacy pickled entry {rel!r}; re-save with torch.export.save")
                if rel.endswith("_config.json"):
                    for fqn, entry in json.loads(archive.read(name))["config"].items():
                        pickled_object = str(entry.get("path_name", "")).startswith(_PT2_PICKLED_PREFIXES)
                        if entry.get("use_pickle") or pickled_object:
                            raise InvalidInput(f"{path}: tensor {fqn!r} is stored pickled; refusing to unpickle")
    except (zipfile.BadZipFile, KeyError, ValueError, AttributeError, TypeError) as error:
        raise InvalidInput(f"{path}: not a valid torch.export archive: {exception_line(error)}") from None


def load_backbone(path: Path, device: torch.device) -> torch.nn.Module | torch.export.ExportedProgram:
    """TorchScript (.pt) or torch.export (.pt2) backbone on `device`, never through pickle (an
    export archive stays an ExportedProgram: the ONNX exporter works from it)."""
    if path.suffix == ".pt":
        try:
            return torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as error:
            raise InvalidInput(
                f"{path}: not a TorchScript archive (torch.jit.save): {exception_line(error)}"
            ) from None
    if path.suffix == ".pt2":
        _check_pt2_archive(path)
        try:
            return move_to_device_pass(torch.export.load(str(path)), device)
        except (RuntimeError, ValueError, KeyError) as error:
            raise InvalidInput(f"{path}: cannot load torch.export archive: {exception_line(error)}") from None
    raise InvalidInput(f"{path}: backbone must be TorchScript (.pt) or a torch.export archive (.pt2)")


def load_head(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C,d], b [C]) as float32 from a safetensors file holding exactly 'weight' and 'bias'."""
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise InvalidInput(f"{path}: not a safetensors file: {exception_line(error)}") from None
    if set(tensors) != _HEAD_KEYS:
        raise InvalidInput(
            f"{path}: head must hold exactly tensors 'weight' and 'bias', found {sorted(tensors)}"
        )
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.ndim != 2 or bias.ndim != 1 or bias.shape[0] != weight.shape[0] or weight.shape[0] == 0:
        raise InvalidInput(
            f"{path}: head 'weight' must be [C,d] and 'bias' [C], "
            f"got {list(weight.shape)} and {list(bias.shape)}"
        )
    if not (weight.is_floating_point() and bias.is_floating_point()):
        raise InvalidInput(
            f"{path}: head tensors must be floating point, got {weight.dtype} and {bias.dtype}"
        )
    weight, bias = weight.float(), bias.float()
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise InvalidInput(f"{path}: head has non-finite values")
    return weight, bias


def model_digest(contents: Sequence[bytes | Path], preprocess: PreprocessConfig) -> str:
    """sha256 hex over the model's files (or bytes) and its preprocessing, each length-prefixed.

    Fits are stored per (name, digest): any change to weights, class list or preprocessing gives
    a new digest, so components fitted on another version are never reused.
    """
    digest = hashlib.sha256()
    for part in contents:
        if isinstance(part, Path):
            digest.update(part.stat().st_size.to_bytes(8, "little"))
            with part.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    config = json.dumps(asdict(preprocess), sort_keys=True).encode()
    digest.update(len(config).to_bytes(8, "little"))
    digest.update(config)
    return digest.hexdigest()


def load_model_dir(
    root: str | Path,
    device: str = "auto",
    max_batch_size: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> TorchBackend:
    """Load and check a model directory; the backbone runs once on zeros to check d against the head."""
    spec = read_model_toml(root)
    torch_device = resolve_device(device)
    weight, bias = load_head(spec.head)
    classes = read_classes(spec.classes) if spec.classes is not None else None
    if classes is not None and len(classes) != weight.shape[0]:
        raise InvalidInput(
            f"{spec.classes}: {len(classes)} lines but the head has C = {weight.shape[0]} classes"
        )
    return TorchBackend(
        name=spec.name,
        digest=model_digest([spec.backbone, spec.head, spec.classes or b""], spec.preprocess),
        backbone=load_backbone(spec.backbone, torch_device),
        weight=weight,
        bias=bias,
        preprocess_config=spec.preprocess,
        class_names=[name for _, name in classes] if classes is not None else None,
        class_wnids=[wnid for wnid, _ in classes] if classes is not None else None,
        device=str(torch_device),
        max_batch_size=max_batch_size,
        limits=limits,
        source=str(spec.backbone),
        runtime=spec.runtime,
        onnx=spec.onnx,
        triton=spec.triton,
    )
