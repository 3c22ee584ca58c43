"""deploy/k8s: every overlay renders and validates, and the manifests say what the server does
(SPEC §3 health names, the drain settings, the variables of `serve`, a read-only root)."""
from __future__ import annotations

import base64
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from k8s_support import K8S, OVERLAYS, SERVER, container, env, find, render
from spurguard.server.backends.builtins import source_directory
from spurguard.server.backends.modeldir import read_model_toml
from spurguard.server.backends.triton_repo import build_parser as export_parser
from spurguard.server.rpc.app import build_parser as serve_parser

# The oldest release with grpc probes GA, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Prometheus Operator kinds: kubernetes-validate has no schema for CRDs; test_monitoring checks them.
CRD_GROUPS = ("monitoring.coreos.com/",)


def _tls_overlay(tmp_path: Path) -> Path:
    """An overlay of cpu with the tls component, as the component's comment says to write it."""
    directory = tmp_path / "tls-overlay"
    directory.mkdir()
    relative = Path(os.path.relpath(K8S, directory))
    (directory / "kustomization.yaml").write_text(
        f"resources: [{relative / 'overlays/cpu'}]\ncomponents: [{relative / 'components/tls'}]\n")
    return directory


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.mark.parametrize("overlay", [*OVERLAYS, "cpu+tls"])
def test_every_overlay_renders_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    directory = _tls_overlay(tmp_path) if overlay == "cpu+tls" else K8S / "overlays" / overlay
    resources = render(directory)
    kinds = {resource["kind"] for resource in resources}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "NetworkPolicy", "ConfigMap", "Secret", "ServiceMonitor", "PrometheusRule"} <= kinds
    for resource in resources:
        if resource["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(resource, version, strict=True)  # raises on the first error


def _pod(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return find(resources, "Deployment", SERVER)["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_pod_keeps_to_the_spec(overlay: str, rendered) -> None:  # noqa: ANN001
    resources = rendered[overlay]
    pod, server = _pod(resources), container(resources)
    variables = env(server)
    # Configured by variables alone, each one a serve flag's (a typo would be ignored silently).
    assert "args" not in server and "command" not in server
    assert set(v for v in variables if v.startswith("SPURGUARD_")) <= set(serve_parser(environ={}).variables())
    assert server["image"].split(":")[0].rsplit("/", 1)[-1] == "spurguard"
    # Probes on the health names of SPEC §3, on the gRPC port.
    port = int(variables["SPURGUARD_PORT"])
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {
        "grpc": port, "metrics": int(variables["SPURGUARD_METRICS_PORT"])}
    probes = {kind: server[f"{kind}Probe"]["grpc"] for kind in ("startup", "readiness", "liveness")}
    assert all(probe["port"] == port for probe in probes.values())
    assert probes["startup"].get("service", "") in ("", "spurguard.v1.Spurguard")
    assert probes["readiness"].get("service", "") in ("", "spurguard.v1.Spurguard")
    assert probes["liveness"]["service"] == "liveness"
    # SIGTERM: readiness seen NOT_SERVING by the kubelet within the drain delay; the pod not killed
    # before the drain delay and the grace period are over.
    drain, grace = float(variables["SPURGUARD_DRAIN_DELAY_S"]), float(variables["SPURGUARD_GRACE_S"])
    readiness = server["readinessProbe"]
    assert readiness["periodSeconds"] * readiness.get("failureThreshold", 3) <= drain
    assert pod["terminationGracePeriodSeconds"] >= drain + grace
    # Non-root, read-only root: what is written goes to the store volume or the emptyDir of TMPDIR.
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in server["volumeMounts"]}
    assert mounts[variables["TMPDIR"]].get("emptyDir") is not None
    assert mounts[variables["SPURGUARD_STORE"]]["persistentVolumeClaim"]["claimName"] == "spurguard-store"
    assert find(resources, "PersistentVolumeClaim", "spurguard-store")["spec"]["accessModes"] == ["ReadWriteMany"]
    token_dir = os.path.dirname(variables["SPURGUARD_AUTH_TOKENS"])
    secret = find(resources, "Secret", mounts[token_dir]["secret"]["secretName"])
    assert os.path.basename(variables["SPURGUARD_AUTH_TOKENS"]) in secret["data"]


def test_the_placeholder_token_file_is_valid_and_matches_no_token(rendered, tmp_path: Path) -> None:  # noqa: ANN001
    from spurguard.server.rpc.auth import TokenFile

    secret = find(rendered["cpu"], "Secret", "spurguard-secrets")
    (tmp_path / "tokens.toml").write_bytes(base64.b64decode(secret["data"]["tokens.toml"]))
    tokens = TokenFile(tmp_path / "tokens.toml")
    assert len(tokens.tokens) == 1 and tokens.find("") is None and tokens.find("replace-me") is None


def test_services_policies_and_scaling_name_what_exists(rendered) -> None:  # noqa: ANN001
    resources = rendered["cpu"]
    deployment = find(resources, "Deployment", SERVER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in container(resources)["ports"]}
    for service in (r for r in resources if r["kind"] == "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert find(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = find(resources, "NetworkPolicy", SERVER)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == ports
    hpa = find(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == SERVER and hpa["spec"]["minReplicas"] >= 2
    assert container(resources)["resources"]["requests"]["cpu"]  # the HPA's utilisation needs a request


def test_monitoring_scrapes_the_metrics_service_and_alerts_per_class(rendered) -> None:  # noqa: ANN001
    resources = rendered["cpu"]
    monitor = find(resources, "ServiceMonitor")
    metrics = find(resources, "Service", "spurguard-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in metrics["spec"]["ports"]]
    rules = [rule for group in find(resources, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]]
    triggers = next(rule for rule in rules if "spurguard_spurious_triggers_total" in rule["expr"])
    assert re.search(r"sum by \(model, class\) \(rate\(spurguard_spurious_triggers_total\[\d+m\]\)\)", triggers["expr"])
    assert "$labels.class" in triggers["annotations"]["summary"]


def test_the_gpu_overlay_asks_for_a_gpu_and_serves_on_cuda(rendered) -> None:  # noqa: ANN001
    resources = rendered["gpu"]
    server = container(resources)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1 and env(server)["SPURGUARD_DEVICE"] == "cuda"
    assert any(t["key"] == "nvidia.com/gpu" for t in _pod(resources)["tolerations"])
    assert server["image"].endswith(":cuda")


def test_the_triton_overlay_points_spurguard_at_the_repository_it_exports(rendered, tmp_path: Path) -> None:  # noqa: ANN001
    resources = rendered["triton"]
    triton_pod = find(resources, "Deployment", "spurguard-triton")["spec"]["template"]["spec"]
    (export,) = triton_pod["initContainers"]
    exported = export_parser().parse_args(export["args"])
    triton = next(c for c in triton_pod["containers"] if c["name"] == "triton")
    assert f"--model-repository={exported.out}" in triton["args"]
    # spurguard's model directory: the demo's files plus the ConfigMap's model.toml, as the
    # model-files initContainer assembles it, names the exported model on the Triton Service.
    server = container(resources)
    (model_dir,) = env(server)["SPURGUARD_MODEL"].split(",")
    configmap = find(resources, "ConfigMap", "spurguard-models")
    local = tmp_path / Path(model_dir).name
    shutil.copytree(source_directory("demo"), local)
    (local / "model.toml").write_text(configmap["data"]["demo.toml"])
    spec = read_model_toml(local)
    assert spec.triton is not None and spec.triton.model == f"{spec.name}_backbone" and exported.model == spec.name
    service = find(resources, "Service", "spurguard-triton")
    host, port = spec.triton.address.split(":")
    assert host == service["metadata"]["name"] and int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= find(
        resources, "Deployment", "spurguard-triton")["spec"]["template"]["metadata"]["labels"].items()
    init = _pod(resources)["initContainers"][0]
    assert "/etc/spurguard/models/demo.toml" in init["args"][0] and f'"{model_dir}' in init["args"][0]
    assert tomllib.loads(configmap["data"]["demo.toml"])["name"] == Path(model_dir).name


def test_the_tls_component_turns_tls_on_with_exec_probes_over_tls(tmp_path: Path) -> None:
    resources = render(_tls_overlay(tmp_path))
    server = container(resources)
    variables = env(server)
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(resources)["volumes"]}
    assert volumes[mounts[os.path.dirname(variables["SPURGUARD_TLS_CERT"])]]["secret"]["secretName"] == "spurguard-tls"
    for kind, service in (("startup", "spurguard.v1.Spurguard"), ("readiness", ""), ("liveness", "liveness")):
        probe = server[f"{kind}Probe"]
        assert "grpc" not in probe
        command = probe["exec"]["command"]
        assert command[:2] == ["spurguard", "health"] and command[command.index("--service") + 1] == service
        assert os.path.dirname(command[command.index("--tls-ca") + 1]) == os.path.dirname(variables["SPURGUARD_TLS_CERT"])
