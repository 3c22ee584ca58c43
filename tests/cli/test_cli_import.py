"""The CLI is part of the thin client: importing it (and running a command) pulls in no torch, PIL or tqdm."""
from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import spurguard.client.cli
try:
    spurguard.client.cli.main(["--server", "127.0.0.1:1", "--timeout", "0.5", "models"])
except SystemExit:
    pass
heavy = [name for name in sys.modules
         if name.split(".")[0] in ("torch", "PIL", "tqdm") or name.startswith("spurguard.server")]
print(",".join(sorted(heavy)))
"""


def test_importing_and_running_the_cli_loads_no_server_dependencies() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""
    assert "UNAVAILABLE" in done.stderr  # the command did run (against nothing)
