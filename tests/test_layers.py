"""The layering of ARCHITECTURE.md, checked: which spurguard package may import which, and what
importing the inner layers loads (no grpc, no stubs, no torch where the layer says so)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER_ROOTS = ("protos", "client", "server")

# package -> the spurguard packages it may import besides itself (ARCHITECTURE.md's table)
ALLOWED = {
    "spurguard.server": set(),
    "spurguard.__main__": {"spurguard.client"},  # python -m spurguard: the CLI
    "spurguard.v1": set(),
    "spurguard.vocab": set(),
    "spurguard.wire": {"spurguard.vocab", "spurguard.v1"},
    "spurguard.client": {"spurguard.vocab", "spurguard.wire", "spurguard.v1"},
    "spurguard.ui": {"spurguard.client", "spurguard.vocab"},  # a client program: the public API only
    "spurguard.server.errors": {"spurguard.vocab"},
    "spurguard.server.engine": {"spurguard.server.errors", "spurguard.vocab"},
    "spurguard.server.backends": {"spurguard.server.errors", "spurguard.server.demo", "spurguard.vocab"},  # demo: its weights
    "spurguard.server.datasets": {"spurguard.server.errors", "spurguard.vocab"},
    "spurguard.server.loader": {"spurguard.server.datasets", "spurguard.server.errors"},
    "spurguard.server.store": {"spurguard.server.engine", "spurguard.server.errors", "spurguard.vocab"},
    "spurguard.server.visualize": {"spurguard.server.backends", "spurguard.server.engine", "spurguard.server.errors",
                                   "spurguard.vocab"},
    "spurguard.server.serving": {
        "spurguard.server.backends", "spurguard.server.datasets", "spurguard.server.engine", "spurguard.server.errors",
        "spurguard.server.loader", "spurguard.server.store", "spurguard.server.visualize", "spurguard.vocab",
    },
    "spurguard.server.rpc": {
        "spurguard.server.backends", "spurguard.server.errors", "spurguard.server.serving", "spurguard.server.store",
        "spurguard.vocab", "spurguard.wire", "spurguard.v1",
    },
    # the demo drives a real server through the thin client, as a user would
    "spurguard.server.demo": {
        "spurguard.client", "spurguard.server.backends", "spurguard.server.datasets", "spurguard.server.engine",
        "spurguard.server.rpc", "spurguard.vocab",
    },
}


def _package(module: str) -> str:
    """The layer a module belongs to: spurguard.<x> or spurguard.server.<x>."""
    parts = [part for part in module.split(".") if part != "__init__"]
    return ".".join(parts[:3] if parts[1:2] == ["server"] else parts[:2])


def _imports() -> dict[str, set[str]]:
    """package -> the spurguard packages its modules import (generated stubs left out)."""
    found: dict[str, set[str]] = {}
    for layer_root in LAYER_ROOTS:
        for path in (ROOT / layer_root / "spurguard").rglob("*.py"):
            if "_pb2" in path.name:
                continue
            module = ".".join(path.relative_to(ROOT / layer_root).with_suffix("").parts)
            targets = found.setdefault(_package(module), set())
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module == "spurguard":
                    names = [f"spurguard.{alias.name}" for alias in node.names]  # from spurguard import vocab
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                else:
                    continue
                targets.update(_package(name) for name in names if name.startswith("spurguard."))
    return found


def test_every_package_imports_only_the_layers_below_it() -> None:
    imports = _imports()
    assert set(imports) <= set(ALLOWED), f"packages missing from the layer table: {set(imports) - set(ALLOWED)}"
    wrong = {package: sorted(targets - ALLOWED[package] - {package}) for package, targets in imports.items()}
    assert {package: targets for package, targets in wrong.items() if targets} == {}


def test_no_server_module_imports_the_cli() -> None:
    """The server's layers never use the CLI's modules; only the demo, the one program that runs
    both sides (a server process, and the client, progress and report a user would use), does."""
    cli_users = [
        path.name
        for path in (ROOT / "server").rglob("*.py")
        if "demo" not in path.relative_to(ROOT / "server").parts
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(name.startswith("spurguard.client.cli")
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]))
    ]
    assert cli_users == []


CHECK = """
import importlib, sys
importlib.import_module(sys.argv[1])
print(",".join(sorted({name.split(".")[0] if not name.startswith("spurguard") else name
                       for name in sys.modules})))
"""


def _loaded(module: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", CHECK, module], capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.strip().split(","))


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("spurguard.server.engine", {"grpc", "google", "spurguard.v1", "spurguard.client"}),
        ("spurguard.server.serving.dataplane", {"grpc", "google", "spurguard.v1", "spurguard.wire", "spurguard.client"}),
        ("spurguard.vocab", {"grpc", "google", "torch", "spurguard.v1", "spurguard.server"}),
        ("spurguard.wire", {"grpc", "torch", "spurguard.server"}),
        ("spurguard.ui.app", {"torch", "spurguard.server"}),  # works against any server, with no server code
    ],
)
def test_importing_a_layer_loads_nothing_above_it(module: str, absent: set[str]) -> None:
    loaded = _loaded(module)
    assert module in loaded  # the check ran
    assert loaded & absent == set()
