"""Regenerate the committed Python stubs of the spurguard API.

    python protos/generate.py            # rewrite protos/spurguard/v1/spurguard_pb2*.py(i)
    python protos/generate.py --out DIR  # write them under DIR/spurguard/v1/ instead (staleness test)

Why a script and not a bare protoc line: the include paths decide the generated import paths
(`from spurguard.v1 import spurguard_pb2`, matching the namespace package), and the well-known
types (google/protobuf/timestamp.proto) come from grpcio-tools' bundled copy; one place gets
both right. Needs the grpcio-tools version pinned in pyproject.toml's dev extra, since its
protoc version is what the stubs' runtime check demands of protobuf.
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTOS = ("spurguard/v1/spurguard.proto",)


def protoc(*output_flags: str) -> None:
    """Run the bundled protoc over every proto file with the given output flags."""
    from grpc_tools import protoc as bundled  # dev-only dependency: imported here, not at module import

    well_known = resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", *output_flags, *PROTOS]
    if bundled.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def generate(out: Path) -> None:
    """Write the message stubs, their type stubs and the gRPC stubs under `out` (which must exist)."""
    protoc(f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    generate(options.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
