"""TLS and mutual TLS end to end: a server with throwaway certificates (made here with the
openssl CLI, signed by a throwaway CA), the client library and the CLI; plaintext clients and
clients without a certificate are turned away, bad configurations fail before the port opens."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from spurguard.client import Client, SpurguardClientError, cli, tls_credentials
from spurguard.server.errors import InvalidInput
from spurguard.server.rpc.app import BackgroundServer, ServerConfig, server_credentials

from pki_support import make_pki

MODEL = "demo"  # the shipped built-in: loads in about a second


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _config(pki: Path, tmp_path: Path, **tls: Path | None) -> ServerConfig:
    return ServerConfig(models=(MODEL,), store=tmp_path / "store", port=0, device="cpu",
                        tls_cert=pki / "server.pem", tls_key=pki / "server.key", **tls)


@pytest.fixture(scope="module")
def tls_server(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    with BackgroundServer(_config(pki, tmp_path_factory.mktemp("tls"))) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    config = _config(pki, tmp_path_factory.mktemp("mtls"), tls_client_ca=pki / "ca.pem")
    with BackgroundServer(config) as server:
        yield server


def _models(target: str, credentials: grpc.ChannelCredentials | None) -> list[str]:
    with Client(target, timeout=10, retries=0, credentials=credentials) as client:
        return [m.name for m in client.list_models()]


def _refused(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(SpurguardClientError) as caught:
        _models(target, credentials)
    return caught.value.code


def test_tls_server_answers_clients_that_trust_its_ca(tls_server: BackgroundServer, pki: Path) -> None:
    ca = (pki / "ca.pem").read_bytes()
    assert _models(tls_server.address, tls_credentials(ca=ca)) == [MODEL]
    assert _refused(tls_server.address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    other_ca = (pki / "other" / "ca.pem").read_bytes()
    assert _refused(tls_server.address, tls_credentials(ca=other_ca)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server: BackgroundServer, pki: Path) -> None:
    ca = (pki / "ca.pem").read_bytes()

    def identity(folder: Path, name: str) -> grpc.ChannelCredentials:
        return tls_credentials(ca=ca, cert=(folder / f"{name}.pem").read_bytes(), key=(folder / f"{name}.key").read_bytes())

    assert _models(mtls_server.address, identity(pki, "client")) == [MODEL]
    assert _refused(mtls_server.address, tls_credentials(ca=ca)) == grpc.StatusCode.UNAVAILABLE
    assert _refused(mtls_server.address, identity(pki / "other", "stranger")) == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="both a client certificate and its key"):
        tls_credentials(ca=ca, cert=(pki / "client.pem").read_bytes())


def test_the_cli_connects_with_tls_options(
    mtls_server: BackgroundServer, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--server", mtls_server.address, "--tls-ca", str(pki / "ca.pem")]
    identity = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
    assert cli.main([*base, *identity, "models", "--json"]) == cli.EXIT_OK
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == [MODEL]
    assert cli.main([*base, "models", "--json", "--timeout", "5"]) == cli.EXIT_ERROR  # no client certificate
    assert "UNAVAILABLE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        cli.main([*base, "--tls-cert", str(pki / "client.pem"), "models"])
    assert usage.value.code == cli.EXIT_USAGE and "--tls-key" in capsys.readouterr().err


def test_bad_tls_configurations_fail_before_serving(pki: Path, tmp_path: Path) -> None:
    config = _config(pki, tmp_path)
    assert server_credentials(replace(config, tls_cert=None, tls_key=None)) is None
    cases = {
        "give both --tls-cert and --tls-key": replace(config, tls_key=None),
        "--tls-client-ca needs --tls-cert": replace(config, tls_cert=None, tls_key=None, tls_client_ca=pki / "ca.pem"),
        "cannot read the TLS key": replace(config, tls_key=tmp_path / "absent.key"),
    }
    for message, bad in cases.items():
        with pytest.raises(InvalidInput, match=message):
            server_credentials(bad)
