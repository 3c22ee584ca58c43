"""The rendered cpu Deployment's container, run here as the kubelet would run it: `spurguard serve`
(the image's ENTRYPOINT) with exactly the container's args and environment, its volumes as temp
folders (the Secret's files written into its own), then its probes, then SIGTERM and the drain
timeline against the manifest's own settings.

What differs from the pod, and only that: each mount point is a temp folder, the ports are free
ones and 0.0.0.0 is 127.0.0.1 (tests listen on loopback only)."""
from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from k8s_support import K8S, container, env, find, render
from spurguard.server.rpc import probe
from spurguard.server.rpc.process import READY_PREFIX
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc

ENTRYPOINT = ["spurguard", "serve"]  # deploy/docker/Dockerfile
CLI = "import sys; from spurguard.client.cli import main; sys.exit(main())"  # the console script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _volume_folders(resources: list[dict[str, Any]], pod: dict[str, Any], root: Path) -> dict[str, Path]:
    """mountPath -> a temp folder with what the kubelet would put there."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    folders = {}
    for mount in container(resources)["volumeMounts"]:
        folder = root / mount["name"]
        folder.mkdir()
        volume = volumes[mount["name"]]
        if "secret" in volume:
            data = find(resources, "Secret", volume["secret"]["secretName"]).get("data", {})
            for key, value in data.items():
                (folder / key).write_bytes(base64.b64decode(value))
        elif "configMap" in volume:
            for key, value in find(resources, "ConfigMap", volume["configMap"]["name"]).get("data", {}).items():
                (folder / key).write_text(value)
        folders[mount["mountPath"]] = folder
    return folders


def _remap(value: str, folders: dict[str, Path], ports: dict[str, str]) -> str:
    for mount_path, folder in folders.items():
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(folder) + value[len(mount_path):]
    return ports.get(value, "127.0.0.1" if value == "0.0.0.0" else value)


def _check(target: str, probe_spec: dict[str, Any]) -> str:
    """A kubelet grpc probe: health Check of the probe's service, within its timeoutSeconds."""
    return probe.check(target, probe_spec["grpc"].get("service", ""), probe_spec.get("timeoutSeconds", 1))


def _list_models_code(target: str) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.SpurguardStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_the_cpu_pod_runs_passes_its_probes_and_drains_within_its_grace(tmp_path: Path) -> None:
    resources = render(K8S / "overlays" / "cpu")
    pod = find(resources, "Deployment", "spurguard")["spec"]["template"]["spec"]
    server = container(resources)
    manifest_env = env(server)
    folders = _volume_folders(resources, pod, tmp_path)
    grpc_port = str(next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc"))
    ports = {str(p["containerPort"]): str(_free_port()) for p in server["ports"]}
    environment = {name: _remap(value, folders, ports) for name, value in manifest_env.items()}
    args = [_remap(arg, folders, ports) for arg in server.get("args", [])]
    assert server.get("command", ENTRYPOINT) == ENTRYPOINT
    # Only what the image's environment would add (PATH) and what finds this checkout's code.
    process_env = {**environment, "PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    target = f"127.0.0.1:{ports[grpc_port]}"
    drain = float(manifest_env["SPURGUARD_DRAIN_DELAY_S"])
    grace_period = pod["terminationGracePeriodSeconds"]

    log = tmp_path / "server.log"
    started = time.monotonic()
    with open(log, "w") as stderr:
        serving = subprocess.Popen([sys.executable, "-c", CLI, *ENTRYPOINT[1:], *args], env=process_env,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=folders[manifest_env["TMPDIR"]])
    try:
        # startupProbe until it succeeds (at most failureThreshold x periodSeconds), then the others.
        startup = server["startupProbe"]
        deadline = started + startup["periodSeconds"] * startup["failureThreshold"]
        while _check(target, startup) != "SERVING":
            assert time.monotonic() < deadline and serving.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        assert _check(target, server["readinessProbe"]) == "SERVING"
        assert _check(target, server["livenessProbe"]) == "SERVING"
        assert serving.stdout is not None and serving.stdout.readline().startswith(READY_PREFIX)
        assert _list_models_code(target) == grpc.StatusCode.UNAUTHENTICATED  # the Secret's token file is on

        signalled = time.monotonic()
        serving.send_signal(signal.SIGTERM)  # what the kubelet sends at the pod's deletion
        readiness_failed = liveness_failed = refused = None
        while serving.poll() is None and time.monotonic() - signalled < grace_period:
            now = time.monotonic() - signalled
            if readiness_failed is None and _check(target, server["readinessProbe"]) != "SERVING":
                readiness_failed = now
            if liveness_failed is None and _check(target, server["livenessProbe"]) != "SERVING":
                liveness_failed = now
            if refused is None and _list_models_code(target) == grpc.StatusCode.UNAVAILABLE:
                refused = now
            time.sleep(0.1)
        exited = time.monotonic() - signalled
        assert serving.wait(timeout=5) == 0, log.read_text()[-3000:]
    finally:
        if serving.poll() is None:
            serving.kill()
            serving.wait()
    readiness = server["readinessProbe"]
    assert readiness_failed is not None and readiness_failed < readiness["periodSeconds"]  # seen by the next probe
    # Calls answered and the pod live through the drain delay, so no load balancer sends it a
    # call it refuses; then refused; then the process ends well inside the kubelet's grace period.
    assert refused is not None and drain * 0.95 <= refused < drain + 2
    assert liveness_failed is None or liveness_failed >= drain * 0.95
    assert drain * 0.95 <= exited < grace_period
    assert "server stopped" in log.read_text()
