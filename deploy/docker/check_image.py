#!/usr/bin/env python3
"""`make deploy-check`'s image part: build the image with podman and check that its entrypoint
passes its own probes, where no registry and no container runtime are at hand.

1. base: a Debian bookworm root filesystem with python3 (mmdebstrap) imported as
   localhost/spurguard-base:bookworm (once; `--rebuild-base` makes it again);
2. build: deploy/docker/Dockerfile with `podman build --isolation=chroot` on that base (the
   Dockerfile's default base is the public python:3.12-slim-bookworm); this machine's pip CA
   bundle (else the system's) and find-links folders are handed to the build stage, mounted;
3. smoke: `podman run` does not work here (cgroups), so the image's filesystem is mounted
   read-only, as in the pod, with a tmpfs on /tmp and on the store, in a mount and network
   namespace of its own (so its 0.0.0.0:50051 is private), and its ENTRYPOINT runs there under
   chroot as the image's USER with exactly the image's environment and no argument; its
   HEALTHCHECK command and `spurguard health --service liveness` must then succeed, stderr must
   be JSON lines, and SIGTERM must end it with status 0, after which the HEALTHCHECK fails.

Stdlib only: it runs on the machine's python3, as root (mmdebstrap, mounts, chroot).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
BASE_IMAGE = "localhost/spurguard-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
PIP_CACHE = Path(os.environ.get("SPURGUARD_DEPLOY_CACHE", "/var/cache/spurguard-deploy")) / "pip"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # what this machine trusts, a TLS-inspecting proxy included
READY_PREFIX = "spurguard serving on "
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0


def run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def build_base(rebuild: bool) -> None:
    exists = subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0
    if exists and not rebuild:
        print(f"base: {BASE_IMAGE} is there")
        return
    with tempfile.TemporaryDirectory() as scratch:
        tarball = Path(scratch) / "rootfs.tar"
        run("mmdebstrap", "--quiet", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(tarball))
        run("podman", "import", "--quiet", str(tarball), BASE_IMAGE, stdout=subprocess.DEVNULL)


def pip_setting(variable: str, key: str) -> str:
    """This machine's pip setting: its variable, else pip's configuration files ("" if none)."""
    if os.environ.get(variable):
        return os.environ[variable]
    done = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"global.{key}"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def build_image(tag: str) -> None:
    """podman build on the local base, with this machine's pip settings (a TLS-inspecting
    proxy's CA bundle, local wheel folders) mounted into the build."""
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    args = ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg", f"TORCH_INDEX_URL={os.environ.get('SPURGUARD_TORCH_INDEX_URL', '')}",
            "-v", f"{PIP_CACHE}:/root/.cache/pip"]
    cert = pip_setting("PIP_CERT", "cert") or SYSTEM_CA_BUNDLE
    if Path(cert).is_file():
        args += ["-v", f"{cert}:/etc/ssl/certs/build-ca.crt:ro", "--build-arg", "PIP_CERT=/etc/ssl/certs/build-ca.crt"]
    links = [folder for folder in pip_setting("PIP_FIND_LINKS", "find-links").split() if Path(folder).is_dir()]
    if links:
        args += [arg for folder in links for arg in ("-v", f"{folder}:{folder}:ro")]
        args += ["--build-arg", f"PIP_FIND_LINKS={' '.join(links)}"]
    run("podman", "build", "--isolation=chroot", "--format=docker", "--quiet", "-f", str(DOCKERFILE), "-t", tag,
        *args, str(REPO), stdout=subprocess.DEVNULL)
    # Older builds' layers (a moved tag, the wheel stage) would pile up on a machine that keeps
    # its storage: pip's cache, not podman's, is what makes the next build quick.
    run("podman", "image", "prune", "--force", stdout=subprocess.DEVNULL)


def inspect(tag: str) -> dict[str, object]:
    out = run("podman", "image", "inspect", "--format",
              '{"config": {{json .Config}}, "health": {{json .HealthCheck}}}', tag, capture_output=True).stdout
    return json.loads(out)


def smoke(tag: str) -> None:
    """Mount the image and run the check inside a private mount + network namespace."""
    image = inspect(tag)
    config, health = image["config"], image["health"]
    assert health and health["Test"][0] == "CMD", f"the image needs an exec-form HEALTHCHECK, not {health}"
    assert config["User"] and not config["User"].startswith(("0:", "root")), f"runs as {config['User']!r}"
    assert config["Entrypoint"] == ["spurguard", "serve"], config["Entrypoint"]
    image_root = run("podman", "image", "mount", tag, capture_output=True).stdout.strip()
    scratch = tempfile.mkdtemp(prefix="spurguard-image-")  # the mounts inside end with the namespace
    try:
        plan = {"image": image_root, "scratch": scratch, "config": config, "healthcheck": health["Test"][1:]}
        run("unshare", "--mount", "--net", "--fork", sys.executable, __file__, "inside", json.dumps(plan))
    finally:
        shutil.rmtree(scratch)
        run("podman", "image", "umount", tag, stdout=subprocess.DEVNULL)


def inside(plan: dict[str, object]) -> None:
    """In the namespaces: the pod's mounts, then the entrypoint and its probes."""
    config = plan["config"]
    environment = config["Env"]
    store = next(item.split("=", 1)[1] for item in environment if item.startswith("SPURGUARD_STORE="))
    user = config["User"]
    run("ip", "link", "set", "lo", "up")
    root = f"{plan['scratch']}/root"
    os.mkdir(root)
    run("mount", "--bind", plan["image"], root)
    run("mount", "-o", "remount,bind,ro", root)  # readOnlyRootFilesystem
    run("mount", "-t", "proc", "proc", f"{root}/proc")
    run("mount", "--rbind", "/dev", f"{root}/dev")
    run("mount", "--rbind", "-o", "ro", "/sys", f"{root}/sys")
    run("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", f"{root}/tmp")  # the pod's emptyDir
    uid, gid = user.split(":") if ":" in user else (user, user)
    run("mount", "-t", "tmpfs", "-o", f"uid={uid},gid={gid}", "tmpfs", f"{root}{store}")  # the store volume

    def in_image(command: list[str]) -> list[str]:
        return ["chroot", f"--userspec={uid}:{gid}", root, "/usr/bin/env", "-i",
                f"--chdir={config.get('WorkingDir') or '/'}", *environment, *command]

    log = Path(plan["scratch"]) / "server.log"
    started = time.monotonic()
    with open(log, "w") as stderr:
        server = subprocess.Popen(in_image(config["Entrypoint"]), stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith(READY_PREFIX), f"no ready line (exit {server.poll()}): {log.read_text()[-3000:]}"
        print(f"smoke: {line.strip()} after {time.monotonic() - started:.1f} s")
        for probe in (plan["healthcheck"], ["spurguard", "health", "--service", "liveness"]):
            done = subprocess.run(in_image(probe), capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{probe}: exit {done.returncode}: {done.stdout}{done.stderr}"
            print(f"smoke: {' '.join(probe)}: {done.stdout.strip()}")
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=STOP_TIMEOUT_S)
        print(f"smoke: SIGTERM -> exit {code} after {time.monotonic() - signalled:.1f} s")
        assert code == 0, log.read_text()[-3000:]
        assert server.stdout.read() == "", "stdout must hold only the ready line"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    lines = log.read_text().splitlines()
    plain = [line for line in lines if not line.startswith("{")]
    assert not plain, f"stderr lines that are not JSON records: {plain[:5]}"
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "logger", "message"} <= set(record) for record in records)
    assert records[-1]["message"] == "server stopped", records[-1]
    after = subprocess.run(in_image(plan["healthcheck"]), capture_output=True, text=True, timeout=30)
    assert after.returncode != 0, "the HEALTHCHECK must fail once the server is gone"


def main(argv: list[str]) -> int:
    if argv[:1] == ["inside"]:
        inside(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="localhost/spurguard:cpu", help="the image to build and check")
    parser.add_argument("--rebuild-base", action="store_true", help="make the Debian base image again")
    args = parser.parse_args(argv)
    for tool in ("podman", "mmdebstrap", "unshare", "chroot", "ip"):
        if shutil.which(tool) is None:
            print(f"check_image: {tool} is missing (apt-get install podman mmdebstrap util-linux iproute2)")
            return 2
    timings = {}
    for name, step in (("base", lambda: build_base(args.rebuild_base)), ("build", lambda: build_image(args.tag)),
                       ("smoke", lambda: smoke(args.tag))):
        started = time.monotonic()
        step()
        timings[name] = time.monotonic() - started
    print("image check passed: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
