"""Throwaway certificates for the TLS tests (made with the openssl CLI): a CA, a server
certificate for 127.0.0.1 and localhost, a client certificate, and a stranger's from another CA."""
from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(pki: Path, name: str, extension: str) -> None:
    """name.key and name.pem, an EC key and its certificate signed by the CA."""
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=pki)
    (pki / f"{name}.ext").write_text(extension + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=pki)


def make_pki(root: Path) -> Path:
    """ca.pem; server.pem/key for 127.0.0.1 and localhost; client.pem/key; other/stranger.pem/key
    from another CA (other/ca.pem)."""
    for folder in (root, root / "other"):
        folder.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", f"/CN=test {folder.name}",
                 cwd=folder)
    _issue(root, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _issue(root, "client", "extendedKeyUsage=clientAuth")
    _issue(root / "other", "stranger", "extendedKeyUsage=clientAuth")
    return root
