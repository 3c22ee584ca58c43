"""Auth (SPEC section 3): bearer tokens with roles on every RPC of every service on the port, the
token file (hashed, validated, rotated without a restart), the client's and the CLI's token, the
start-up warnings about who can reach the port, and the metrics endpoint's own host.

Servers are in-process (BackgroundServer, port 0) on loopback with the shipped `demo` model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from spurguard.client import Client, SpurguardClientError, cli
from spurguard.server.errors import InvalidInput, PermissionDenied, Unauthenticated
from spurguard.server.rpc import auth
from spurguard.server.rpc.app import BackgroundServer, ServerConfig, build_parser, config_from_args, main

from rpc_support import random_png, scrape_metrics

MODEL = "demo"
CODE = grpc.StatusCode
TOKENS = {"score": "tok-score-1", "label": "tok-label-22", "admin": "tok-admin-333"}  # role -> token

# What SPEC section 3 (and issue 11) say each RPC needs; None: open.
SPEC_ROLES: dict[str, auth.RoleName | None] = {
    **{f"/spurguard.v1.Spurguard/{m}": "score"
       for m in ("ListModels", "GetModel", "GetComponents", "ListLabels", "Score", "ScoreStream")},
    **{f"/spurguard.v1.Spurguard/{m}": "label" for m in ("Label", "Visualize")},
    **{f"/spurguard.v1.Spurguard/{m}": "admin"
       for m in ("Fit", "WatchJob", "GetJob", "ListJobs", "CancelJob", "Evaluate", "Transfer")},
    **{f"/inference.GRPCInferenceService/{m}": None for m in ("ServerLive", "ServerReady", "ModelReady")},
    **{f"/inference.GRPCInferenceService/{m}": "score" for m in ("ModelMetadata", "ModelConfig", "ModelInfer")},
    "/grpc.health.v1.Health/Check": None,
    "/grpc.health.v1.Health/Watch": None,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": None,
}


def entry(name: str, role: str, token: str) -> str:
    return f'[[token]]\nname = "{name}"\nrole = "{role}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    """A token file with one entry per role -> token, named after the role."""
    path.write_text("\n".join(entry(f"{role}-user", role, token) for role, token in tokens.items()))
    return path


def config(tmp: Path, **changes: object) -> ServerConfig:
    return ServerConfig(models=(MODEL,), store=tmp / "store", port=0, device="cpu", grace_s=1.0, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    tmp = tmp_path_factory.mktemp("auth")
    with BackgroundServer(config(tmp, auth_tokens=write_tokens(tmp / "tokens.toml", TOKENS))) as running:
        yield running


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


# ---- every RPC of every service ----


def served_methods(address: str) -> list[MethodDescriptor]:
    """Every method of every service the server says (by reflection, open to all) it serves."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = [service.name for service in reply.list_services_response.service]
    pool = descriptor_pool.Default()
    return [method for name in names for method in pool.FindServiceByName(name).methods]


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call(channel: grpc.Channel, method: MethodDescriptor, token: str | None) -> CODE:
    """One call of `method` with an empty request (or request stream): the status it ends with,
    OK if a streaming reply got as far as its first message."""
    request = message_factory.GetMessageClass(method.input_type)()
    kinds: dict[tuple[bool, bool], Callable[..., Callable[..., object]]] = {
        (False, False): channel.unary_unary, (False, True): channel.unary_stream,
        (True, False): channel.stream_unary, (True, True): channel.stream_stream,
    }
    stub = kinds[(method.client_streaming, method.server_streaming)](
        path(method), request_serializer=type(request).SerializeToString, response_deserializer=bytes
    )
    argument = iter(()) if method.client_streaming else request
    try:
        reply = stub(argument, metadata=bearer(token), timeout=20)
        if method.server_streaming:
            next(reply, None)  # type: ignore[call-overload]
            reply.cancel()  # type: ignore[attr-defined]  # health's Watch never ends by itself
    except grpc.RpcError as error:
        return error.code()  # type: ignore[attr-defined, no-any-return]
    return CODE.OK


def test_the_role_table_names_every_method_served_and_nothing_else(server: BackgroundServer) -> None:
    served = {path(method) for method in served_methods(server.address)}
    assert served == set(auth.METHOD_ROLES)
    assert set(SPEC_ROLES) <= served
    assert {p: auth.METHOD_ROLES[p] for p in SPEC_ROLES} == SPEC_ROLES
    # the OIP RPCs the SPEC does not name (metadata, UNIMPLEMENTED ones) still need a token
    assert all(role is not None for p, role in auth.METHOD_ROLES.items() if p not in SPEC_ROLES)


@pytest.mark.parametrize("caller", [None, "unknown", *auth.ROLES])
def test_auth_matrix_each_role_times_each_rpc(server: BackgroundServer, caller: str | None) -> None:
    token = {None: None, "unknown": "not-a-token"}.get(caller, TOKENS.get(caller or ""))

    def expected(needed: auth.RoleName | None) -> str:
        if needed is None:
            return "allowed"
        if caller not in auth.ROLES:
            return CODE.UNAUTHENTICATED.name
        return "allowed" if auth.ROLES.index(caller) >= auth.ROLES.index(needed) else CODE.PERMISSION_DENIED.name

    methods = served_methods(server.address)
    with grpc.insecure_channel(server.address) as channel:
        outcomes = {path(m): call(channel, m, token) for m in methods}
    got = {p: code.name if code in (CODE.UNAUTHENTICATED, CODE.PERMISSION_DENIED) else "allowed"
           for p, code in outcomes.items()}
    assert got == {path(m): expected(auth.METHOD_ROLES[path(m)]) for m in methods}


def test_refusals_say_why(server: BackgroundServer) -> None:
    with Client(server.address, timeout=10, retries=0) as anonymous:
        with pytest.raises(SpurguardClientError) as missing:
            anonymous.list_models()
    assert missing.value.code == CODE.UNAUTHENTICATED and "Bearer TOKEN" in missing.value.details
    with Client(server.address, timeout=10, retries=0, token=TOKENS["score"]) as scorer:
        with pytest.raises(SpurguardClientError) as low:
            scorer.label(MODEL, 0, 0, "spurious")
    assert low.value.code == CODE.PERMISSION_DENIED
    assert low.value.details == "token 'score-user' has role score; spurguard.v1.Spurguard/Label needs label"


def test_the_client_sends_its_token_on_unary_and_streaming_calls(server: BackgroundServer) -> None:
    rng = np.random.default_rng(0)
    with Client(server.address, timeout=30, retries=0, token=TOKENS["admin"]) as client:
        assert [m.name for m in client.list_models()] == [MODEL]  # unary
        results = list(client.score_stream(MODEL, [random_png(rng) for _ in range(3)]))  # both ways streaming
        assert len(results) == 3 and all(r.error is None for r in results)
        with pytest.raises(SpurguardClientError) as unknown_job:
            list(client.watch_job("no-such-job"))  # server streaming: past auth, to the data plane
        assert unknown_job.value.code == CODE.NOT_FOUND
    for bad in ("", "two words", "tab\t", "naïve"):
        with pytest.raises(ValueError, match="printable ASCII"):
            Client(server.address, token=bad)


def test_the_cli_takes_the_token_from_the_flag_or_the_environment(
    server: BackgroundServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cli.TOKEN_ENV, raising=False)
    base = ["--server", server.address, "--timeout", "10"]
    assert cli.main([*base, "models", "--json"]) == cli.EXIT_ERROR
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main([*base, "models", "--json", "--token", TOKENS["score"]]) == cli.EXIT_OK
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == [MODEL]
    monkeypatch.setenv(cli.TOKEN_ENV, TOKENS["score"])
    assert cli.main([*base, "jobs", "--json"]) == cli.EXIT_ERROR
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    monkeypatch.setenv(cli.TOKEN_ENV, TOKENS["admin"])
    assert cli.main([*base, "jobs", "--json"]) == cli.EXIT_OK
    capsys.readouterr()


# ---- the token file ----


def test_the_check_reads_one_bearer_entry(tmp_path: Path) -> None:
    tokens = auth.TokenFile(write_tokens(tmp_path / "t.toml", TOKENS))
    label = "/spurguard.v1.Spurguard/Label"
    auth.check(tokens, label, [("authorization", f"bearer {TOKENS['label']}")])  # the scheme is case-insensitive
    auth.check(tokens, "/grpc.health.v1.Health/Check", None)
    for method, metadata, error in [
        (label, [("authorization", f"Basic {TOKENS['admin']}")], Unauthenticated),
        (label, [("authorization", "Bearer ")], Unauthenticated),
        (label, [("authorization", f"Bearer {TOKENS['admin']}")] * 2, Unauthenticated),
        (label, [("x-token", TOKENS["admin"])], Unauthenticated),
        (label, [("authorization", f"Bearer {TOKENS['score']}")], PermissionDenied),
        ("/spurguard.v1.Spurguard/Unlisted", [("authorization", f"Bearer {TOKENS['label']}")], PermissionDenied),
    ]:
        with pytest.raises(error):
            auth.check(tokens, method, metadata)
    auth.check(tokens, "/spurguard.v1.Spurguard/Unlisted", [("authorization", f"Bearer {TOKENS['admin']}")])
    found = tokens.find(TOKENS["admin"])
    assert found is not None and found.name == "admin-user" and tokens.find("nope") is None


GOOD = entry("a", "score", "t")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[token]\n", "not valid TOML"),
        ("", "no \\[\\[token\\]\\] tables"),
        ("token = 3\n", "no \\[\\[token\\]\\] tables"),
        ("extra = 1\n" + GOOD, "only \\[\\[token\\]\\] tables"),
        ('[[token]]\nname = "a"\nrole = "score"\n', "wrong or missing: sha256"),
        (GOOD + 'secret = "t"\n', "wrong or missing: secret"),
        (GOOD.replace('"score"', '"root"'), "role must be one of score, label, admin"),
        (GOOD.replace('"a"', '""'), "name must be a non-empty string"),
        (GOOD.replace(hashlib.sha256(b"t").hexdigest(), "t"), "sha256 must be 64 hex digits"),
        (GOOD.replace(hashlib.sha256(b"t").hexdigest(), "z" * 64), "sha256 must be 64 hex digits"),
        (GOOD + entry("a", "admin", "u"), "the same name"),
        (GOOD + entry("b", "admin", "t"), "the same sha256"),
    ],
)
def test_a_malformed_token_file_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "t.toml").write_text(text)
    with pytest.raises(InvalidInput, match=message):
        auth.load_tokens(tmp_path / "t.toml")


def test_write_tokens_writes_a_private_file_that_loads_back_and_keeps_no_token(tmp_path: Path) -> None:
    """What the demo issues its tokens with: any name survives TOML quoting, the file replaces a
    readable one as 0600, and only the digests are in it."""
    path = tmp_path / "tokens.toml"
    path.write_text("old")
    path.chmod(0o644)
    names = ['a "quoted" \\ name', "tab\tnew\nline del\x7f", "\u00e9t\u00e9 \U0001f600"]
    written = [auth.Token.of(name, role, f"secret-{role}") for name, role in zip(names, auth.ROLES)]
    auth.write_tokens(path, written)
    assert auth.load_tokens(path) == tuple(written)
    assert path.stat().st_mode & 0o777 == 0o600
    assert "secret-" not in path.read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["tokens.toml"]
    assert auth.TokenFile(path).find("secret-label") == written[1]


def test_a_bad_token_file_stops_serve_before_the_port_opens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.toml").write_text(GOOD.replace('"score"', '"root"'))
    argv = ["--model", MODEL, "--store", str(tmp_path / "store"), "--port", "0", "--device", "cpu"]
    assert main([*argv, "--auth-tokens", str(tmp_path / "t.toml")]) == 2
    assert "role must be one of" in capsys.readouterr().err
    assert main([*argv, "--auth-tokens", str(tmp_path / "absent.toml")]) == 2
    assert "cannot read the token file" in capsys.readouterr().err


def _works(address: str, token: str) -> bool:
    """Whether a call with `token` gets past auth; any other refusal fails the test."""
    with Client(address, timeout=10, retries=0, token=token) as client:
        try:
            client.list_models()
        except SpurguardClientError as error:
            assert error.code == CODE.UNAUTHENTICATED, error
            return False
    return True


def _within(seconds: float, condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_rotation_without_a_restart_and_a_bad_rewrite_keeps_the_last_good_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bound = 3 * auth.RELOAD_CHECK_S + 2  # a check is due at most RELOAD_CHECK_S after a call
    tokens = write_tokens(tmp_path / "tokens.toml", {"score": "old-token"})
    with BackgroundServer(config(tmp_path, auth_tokens=tokens)) as server, caplog.at_level(logging.INFO, "spurguard.server"):
        assert _works(server.address, "old-token") and not _works(server.address, "new-token")
        write_tokens(tokens, {"score": "new-token"})  # edited in place
        assert _within(bound, lambda: _works(server.address, "new-token"))
        assert not _works(server.address, "old-token")
        replacement = tmp_path / "next.toml"
        write_tokens(replacement, {"admin": "newest-token"})
        os.replace(replacement, tokens)  # replaced atomically, as config management does
        assert _within(bound, lambda: _works(server.address, "newest-token"))
        assert not _works(server.address, "new-token")
        tokens.write_text("[[token]]\nname = broken")  # the file is looked at on calls, as they come
        assert _within(bound, lambda: _works(server.address, "newest-token") and "keeping the last good" in caplog.text)
        assert "keeping the last good tokens (1)" in caplog.text
        assert "not valid TOML" in caplog.text and "reloaded 1 tokens" in caplog.text


# ---- who can reach the port ----


@pytest.mark.parametrize(
    ("host", "auth_on", "tls", "warning"),
    [
        ("127.0.0.1", False, False, None),
        ("::1", False, False, None),
        ("localhost", True, False, None),
        ("0.0.0.0", False, False, "anyone who can connect may score, label, fit"),
        ("0.0.0.0", False, True, "anyone who can connect"),
        ("::", True, False, "tokens travel in plaintext"),
        ("spurguard.example", True, False, "tokens travel in plaintext"),
        ("10.0.0.5", True, True, None),
    ],
)
def test_exposure_warning(host: str, auth_on: bool, tls: bool, warning: str | None) -> None:
    said = auth.exposure_warning(host, auth=auth_on, tls=tls)
    assert said is None if warning is None else warning in (said or "")


@pytest.mark.parametrize("with_auth", [False, True])
def test_start_logs_the_exposure_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, with_auth: bool
) -> None:
    monkeypatch.setattr(auth, "is_loopback", lambda host: False)  # as if --host were 0.0.0.0; binds loopback only
    tokens = write_tokens(tmp_path / "t.toml", TOKENS) if with_auth else None
    with caplog.at_level(logging.INFO, "spurguard.server"), BackgroundServer(config(tmp_path, auth_tokens=tokens)):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    wanted = "tokens travel in plaintext" if with_auth else "anyone who can connect may score, label, fit"
    assert any(wanted in message for message in warnings), warnings
    assert ("auth on: 3 tokens" in caplog.text) == with_auth


def _answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5):
            return True
    except urllib.error.URLError:
        return False


def test_metrics_stay_on_their_own_host_whatever_the_grpc_host(tmp_path: Path) -> None:
    # gRPC on 127.0.0.2 (as --host 0.0.0.0 would, somewhere else than the metrics' default 127.0.0.1)
    with BackgroundServer(config(tmp_path, host="127.0.0.2", metrics_port=0)) as server:
        assert server.metrics_port is not None and server.address.startswith("127.0.0.2:")
        assert "spurguard_requests_total" in scrape_metrics(server.metrics_port)[0]  # 127.0.0.1
        assert not _answers("127.0.0.2", server.metrics_port)


def test_serve_flags_for_auth_and_the_metrics_host() -> None:
    base = ["--model", MODEL, "--store", "s"]
    assert (config_from_args(build_parser().parse_args(base)).auth_tokens,
            config_from_args(build_parser().parse_args(base)).metrics_host) == (None, "127.0.0.1")
    parsed = config_from_args(build_parser().parse_args([*base, "--auth-tokens", "t.toml", "--metrics-host", "0.0.0.0"]))
    assert (parsed.auth_tokens, parsed.metrics_host) == (Path("t.toml"), "0.0.0.0")
