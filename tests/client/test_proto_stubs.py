"""The committed stubs match the proto, and the proto keeps the contract SPEC.md names.

Why: the stubs are committed (so `pip install spurguard` needs no protoc), which makes stale
stubs a silent risk; and outside checks call RPCs by name, so a rename must fail here first.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

from spurguard.v1 import spurguard_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
STUBS = ("spurguard_pb2.py", "spurguard_pb2.pyi", "spurguard_pb2_grpc.py")

# name -> (client streaming, server streaming)
RPCS = {
    "ListModels": (False, False),
    "GetModel": (False, False),
    "Fit": (False, True),
    "WatchJob": (False, True),
    "GetJob": (False, False),
    "ListJobs": (False, False),
    "CancelJob": (False, False),
    "GetComponents": (False, False),
    "Label": (False, False),
    "ListLabels": (False, False),
    "WatchLabels": (False, True),
    "Visualize": (False, True),
    "Score": (False, False),
    "ScoreStream": (True, True),
    "Evaluate": (False, True),
    "Transfer": (False, True),
}


def _generate_module() -> ModuleType:
    """protos/generate.py, which is a script rather than a package module."""
    spec = importlib.util.spec_from_file_location("spurguard_generate", PROTOS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) regenerates the stubs")
    subprocess.run(
        [sys.executable, str(PROTOS / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "spurguard" / "v1" / name).read_bytes()
        committed = (PROTOS / "spurguard" / "v1" / name).read_bytes()
        assert committed == fresh, f"{name} is stale: run `python protos/generate.py` and commit the result"


def test_service_has_the_rpcs_of_the_spec() -> None:
    service = pb.DESCRIPTOR.services_by_name["Spurguard"]
    assert service.full_name == "spurguard.v1.Spurguard"
    found = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert found == RPCS


def test_field_names_match_the_cli_json_keys() -> None:
    """Result fields are named like the `score --json` / `evaluate --json` keys (SPEC section 3)."""
    renamed = {"image_id": "image", "class_index": "class"}
    score_keys = {renamed.get(f.name, f.name) for f in pb.ScoreResult.DESCRIPTOR.fields}
    assert {"image", "predictions", "class", "logit", "bias_term", "residual", "components",
            "spurious_alpha", "trigger", "spufix"} <= score_keys
    assert {renamed.get(f.name, f.name) for f in pb.ClassScore.DESCRIPTOR.fields} == {
        "class", "auc", "ap", "clean_mean_prob", "spurious_mean_prob",
        "clean_frac_predicted", "spurious_frac_predicted",
    }
    assert {"index", "eigenvalue", "explained_variance", "alpha_mean", "alpha_floor", "alpha_max",
            "label"} <= {f.name for f in pb.Component.DESCRIPTOR.fields}


def test_every_message_field_and_enum_value_is_documented(tmp_path: Path) -> None:
    """The proto is the API people read: every declaration carries a comment."""
    pytest.importorskip("grpc_tools")
    out = tmp_path / "descriptor.pb"
    _generate_module().protoc("--include_source_info", f"--descriptor_set_out={out}")
    (file,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    commented = {
        tuple(loc.path)
        for loc in file.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }
    # FileDescriptorProto: message_type = 4, enum_type = 5, service = 6; in them: field = 2,
    # enum value = 2, method = 2.
    wanted: dict[tuple[int, ...], str] = {}
    for i, message in enumerate(file.message_type):
        wanted[(4, i)] = message.name
        for j, field in enumerate(message.field):
            wanted[(4, i, 2, j)] = f"{message.name}.{field.name}"
    for i, enum in enumerate(file.enum_type):
        wanted[(5, i)] = enum.name
        for j, value in enumerate(enum.value):
            wanted[(5, i, 2, j)] = f"{enum.name}.{value.name}"
    for i, service in enumerate(file.service):
        wanted[(6, i)] = service.name
        for j, method in enumerate(service.method):
            wanted[(6, i, 2, j)] = f"{service.name}.{method.name}"
    missing = sorted(name for path, name in wanted.items() if path not in commented)
    assert not missing, f"undocumented in spurguard.proto: {missing}"
