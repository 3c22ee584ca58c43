"""Ways in to the CLI besides the console script: `python -m spurguard[.client]`, `--version`."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cli_fakes import FakeClient, RunCli
from spurguard.client import cli

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_version_prints_the_installed_version(cli_run: RunCli) -> None:
    outcome = cli_run(FakeClient(), "--version")
    assert (outcome.code, outcome.out, outcome.err) == (0, f"spurguard {importlib.metadata.version('spurguard')}\n", "")
    assert outcome.connects == []


def test_version_from_a_source_checkout_is_pyprojects(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == tomllib.loads(PYPROJECT.read_text())["project"]["version"]


@pytest.mark.parametrize("module", ["spurguard", "spurguard.client"])
def test_python_dash_m_runs_the_cli(module: str) -> None:
    """`spurguard` is a namespace package (no __init__.py): its __main__ must still be found."""
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"spurguard {cli.version()}\n"), done.stderr
    done = subprocess.run([sys.executable, "-m", module, "models", "--server", "127.0.0.1:1", "--timeout", "0.5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == cli.EXIT_ERROR and done.stderr.startswith("spurguard: error: UNAVAILABLE: ")


WITHOUT_TORCH = """
import sys

class NoTorch:  # as on `pip install spurguard` without the server extra
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorch())
from spurguard.client.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "argv",
    [["serve", "--help"], ["demo", "--help"], ["serve", "-h"], ["--json", "serve", "--help"], ["export-triton", "--help"]],
)
def test_help_of_serve_and_demo_without_the_server_extra_names_it(argv: list[str]) -> None:
    """Their options are the server's own, so even --help needs the extra: say which to install."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == cli.EXIT_USAGE and done.stdout == ""
    assert done.stderr.startswith(f"spurguard: error: `spurguard {argv[-2]}` needs the server")
    assert "install it with: pip install 'spurguard[server]'" in done.stderr and done.stderr.count("\n") == 1
