"""A real Triton Inference Server (triton_server.py in the PyTriton venv) as a child process, for
the [triton] tests and `make bench`: started on free 127.0.0.1 ports, ready when it prints READY
to its log file, stopped by pid with SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
READY_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_triton_venv() -> str | None:
    """Make .venv-triton (`make triton-venv`) if it is missing; why not, when that fails."""
    if (ROOT / ".venv-triton" / ".installed").is_file():
        return None
    made = subprocess.run(["make", "-C", str(ROOT), "triton-venv"], capture_output=True, text=True)
    return None if made.returncode == 0 else f"cannot install PyTriton into .venv-triton: {made.stderr.strip()[-500:]}"


class TritonProcess:
    """triton_server.py serving `graph` as `model`, on fixed ports so that a restart comes back
    at the same URL; with `pki` (pki_support.make_pki) over mutual TLS."""

    def __init__(self, graph: Path, model: str, pki: Path | None = None) -> None:
        self.graph = graph
        self.model = model
        self.pki = pki
        self.grpc_port, self.http_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start it and wait until it serves; RuntimeError with the log's tail if it does not."""
        libdir = subprocess.run(
            [TRITON_PYTHON, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            check=True, capture_output=True, text=True,
        ).stdout.strip() or sysconfig.get_config_var("LIBDIR")
        # its Python-backend stub links the system libpython
        env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        env.pop("PYTHONPATH", None)
        command = [TRITON_PYTHON, Path(__file__).with_name("triton_server.py"), self.graph, self.model,
                   str(self.grpc_port), str(self.http_port), *([self.pki] if self.pki else [])]
        self.starts += 1
        log = self.graph.with_name(f"triton-{self.grpc_port}-{self.starts}.log")  # a file, not a pipe: nobody drains it later
        with log.open("w") as output:
            self.process = subprocess.Popen([str(part) for part in command], env=env, stdout=output,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            if re.search(r"^READY$", log.read_text(errors="replace"), re.MULTILINE):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Triton did not start:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))

    def stop(self) -> None:
        """SIGTERM by pid (SIGINT is ignored in non-interactive shells), then wait for it."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
