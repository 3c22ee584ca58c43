"""The labelling app without a browser: its event streams (cancelled with the page, snapshots
only on change, errors in words), the guards on label writes, its headers, and the command."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ui_support import MODEL, PEOPLE, SOURCE, SOURCE_LABEL, UI_TOP, World, labelling_page

from spurguard import vocab as t
from spurguard.client import Client, SpurguardClientError
from spurguard.client.cli.run import main as cli_main
from spurguard.server.rpc import auth
from spurguard.server.rpc.app import BackgroundServer, ServerConfig
from spurguard.ui.events import label_poll, label_watch, relay
from spurguard.ui.gateway import Problem

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rpc"))
from pki_support import make_pki  # noqa: E402


class FakeStream:
    """A Visualize stream: `updates`, then blocks (an attack still running) until cancelled."""

    def __init__(self, updates: list[t.VisualizeUpdate], then_block: bool = True, error: SpurguardClientError | None = None) -> None:
        self.updates, self.then_block, self.error = updates, then_block, error
        self.cancelled = threading.Event()

    def __iter__(self) -> Iterator[t.VisualizeUpdate]:
        yield from self.updates
        if self.error is not None:
            raise self.error
        if self.then_block:
            self.cancelled.wait(30)

    def cancel(self) -> None:
        self.cancelled.set()


FRAME = t.AttackFrame(component=0, step=0, alpha=0.5, prob=0.25, png=b"\x89PNG")


def test_closing_a_visualize_stream_cancels_the_call() -> None:
    """What happens when the page is left: the response's generator is closed mid-attack."""
    stream = FakeStream([FRAME])

    async def read_one_then_leave() -> str:
        events = relay(lambda: stream, "server:1")  # type: ignore[arg-type, return-value]
        first = await events.__anext__()
        await events.aclose()
        return first

    first = asyncio.run(read_one_then_leave())
    assert first.startswith("event: frame\ndata: ") and '"png":"data:image/png;base64,iVBORw=="' in first
    assert stream.cancelled.is_set()


def test_a_visualize_error_is_one_event_in_words_and_ends_the_stream() -> None:
    error = SpurguardClientError(grpc.StatusCode.PERMISSION_DENIED, "token viewer has role score; Visualize needs label")
    stream = FakeStream([], error=error)

    async def read_all() -> list[str]:
        return [e async for e in relay(lambda: stream, "server:1")]  # type: ignore[arg-type, return-value]

    (only,) = asyncio.run(read_all())
    name, data = only.split("\n")[0], json.loads(only.split("\n")[1][len("data: "):])
    assert name == "event: error"
    assert data["code"] == "PERMISSION_DENIED" and data["error"].startswith("Not allowed")
    assert data["details"] == "token viewer has role score; Visualize needs label"


def test_polled_labels_send_a_snapshot_when_it_changes_and_each_problem_once() -> None:
    snapshots: list[Any] = [{"a": 1}, {"a": 1}, Problem(503, "UNAVAILABLE", "cannot be reached", "x"),
                            Problem(503, "UNAVAILABLE", "cannot be reached", "x"), {"a": 1}, {"a": 2}]

    def read() -> dict[str, Any]:
        item = snapshots.pop(0)
        if isinstance(item, Problem):
            raise item
        return item

    async def collect() -> list[str]:
        sent, watch = [], label_poll(read, 0.001, keepalive_s=1e9)
        async for message in watch:
            sent.append(message.split("\n")[0] + " " + message.split("\n")[1])
            if not snapshots:
                break
        await watch.aclose()
        return sent

    assert asyncio.run(collect()) == [
        'event: labels data: {"a":1}', 'event: error data: {"code":"UNAVAILABLE","error":"cannot be reached",'
        '"details":"x"}', 'event: labels data: {"a":1}', 'event: labels data: {"a":2}',
    ]


class FakeWatch:
    """A WatchLabels stream: its snapshots, then the end (a drain) or an error."""

    def __init__(self, snapshots: list[dict[str, Any]], error: SpurguardClientError | None = None) -> None:
        self.snapshots, self.error, self.cancelled = snapshots, error, False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.snapshots
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


def _first_lines(messages: list[str]) -> list[str]:
    return [m.split("\n")[0] + " " + m.split("\n")[1] for m in messages]


def test_watched_labels_are_pushed_reopened_after_a_drain_and_polled_where_there_is_no_watch() -> None:
    unavailable = SpurguardClientError(grpc.StatusCode.UNAVAILABLE, "draining")
    unimplemented = SpurguardClientError(grpc.StatusCode.UNIMPLEMENTED, "Method not found")
    watches = [FakeWatch([{"a": 1}, {"a": 1}, {"a": 2}]),  # a repeat is not news; then the server drains
               FakeWatch([{"a": 2}], unavailable),  # reopened elsewhere: same state, then a failure
               FakeWatch([], unavailable),  # the same failure again: said once
               FakeWatch([], unimplemented)]  # an older server: poll instead
    opened: list[FakeWatch] = []
    polled = [{"a": 3}]

    def open_watch() -> FakeWatch:
        opened.append(watches.pop(0))
        return opened[-1]

    async def collect() -> list[str]:
        sent: list[str] = []
        stream = label_watch(open_watch, lambda snapshot: snapshot, lambda: polled[0], "server:1", 0.001,
                             keepalive_s=1e9)
        async for message in stream:
            sent.append(message)
            if len(sent) == 4:
                break
        await stream.aclose()
        return sent

    assert _first_lines(asyncio.run(collect())) == [
        'event: labels data: {"a":1}', 'event: labels data: {"a":2}',
        'event: error data: {"code":"UNAVAILABLE","error":"The spurguard server cannot be reached or is not ready yet; '
        'the page tries again.","details":"draining (server server:1)"}',
        'event: labels data: {"a":3}',
    ]
    assert len(opened) == 4 and all(w.cancelled for w in opened)


# ---- the app on a real server ----


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_label_writes_come_only_from_the_page_itself(world: World) -> None:
    k = world.planted["watermark"]
    with labelling_page(world, "alice") as page:
        url = f"{page.url}api/models/{MODEL}/classes/{k}/components/3/label"
        body = json.dumps({"label": "spurious", "note": "x"}).encode()
        status, reply = _post(url, body, {"Content-Type": "application/json", "Origin": "http://evil.example"})
        assert status == 403 and reply["error"] == "Labels can only be set from this page."
        status, reply = _post(url, body, {"Content-Type": "text/plain"})  # what a cross-site form can send
        assert status == 415
        status, reply = _post(url, b"{not json", {"Content-Type": "application/json"})
        assert status == 400 and reply["code"] == "INVALID_ARGUMENT"
        status, reply = _post(url, json.dumps({"label": "maybe"}).encode(), {"Content-Type": "application/json"})
        assert status == 400 and "label must be one of" in reply["details"]
        with world.client("admin") as admin:
            assert admin.list_labels(MODEL, class_index=k, component=3) == []
        status, reply = _post(url, body, {"Content-Type": "application/json", "Origin": page.url.rstrip("/")})
        assert status == 200 and (reply["label"], reply["note"], reply["author"]) == ("spurious", "x", "alice")


def test_a_foreign_host_header_is_refused_and_pages_carry_a_strict_policy(world: World) -> None:
    with labelling_page(world, "alice") as page:
        connection = http.client.HTTPConnection("127.0.0.1", page.port, timeout=30)
        connection.request("GET", "/", headers={"Host": "attacker.example"})  # DNS rebinding
        assert connection.getresponse().status == 400
        with urllib.request.urlopen(page.url, timeout=30) as reply:
            policy = reply.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "script-src 'self'" in policy
            assert reply.headers["X-Content-Type-Options"] == "nosniff"
            assert f'href="/models/{MODEL}"' in reply.read().decode()


def test_transferred_labels_are_shown_on_the_targets_pages(world: World) -> None:
    """Which labels came from which model: the target's class page lists the source's labels
    of that class that its scores now remove, and its models row names the source."""
    k = world.planted["flower"]
    with labelling_page(world, "alice") as page:
        with urllib.request.urlopen(page.url, timeout=30) as reply:
            models = reply.read().decode()
        with urllib.request.urlopen(f"{page.url}models/{MODEL}/classes/{k}", timeout=30) as reply:
            target = reply.read().decode()
        with urllib.request.urlopen(f"{page.url}models/{SOURCE}/classes/{k}", timeout=30) as reply:
            source = reply.read().decode()
    assert f'from <a href="/models/{SOURCE}">{SOURCE}</a>' in models
    component, label, note = SOURCE_LABEL
    box = target[target.index('<section class="transfer"'):target.index("</section>", target.index('<section class="transfer"'))]
    assert f'Transferred from <a href="/models/{SOURCE}/classes/{k}">{SOURCE}</a>' in box
    assert f'<span class="label {label}">' in box and f"{SOURCE} component {component}: “{note}” — admin" in box
    assert '<section class="transfer"' not in source  # the source labels its own components


def test_the_classes_page_shows_labelling_progress(world: World) -> None:
    """Per fitted class: how many of the first --top components are labelled, and which are spurious."""
    component, _, _ = SOURCE_LABEL
    with labelling_page(world, "alice") as page:
        with urllib.request.urlopen(f"{page.url}models/{SOURCE}", timeout=30) as reply:
            text = reply.read().decode()
    for k in sorted(world.planted.values()):
        row = text[text.index(f'<tr data-class="{k}">'):]
        row = row[:row.index("</tr>")]
        assert f'<progress value="1" max="{UI_TOP}"' in row and f"1 / {UI_TOP}" in row
        assert f'<span class="label spurious" title="spurious components">{component}</span>' in row
    assert f'<tr data-class="{world.unfitted}">' not in text  # only fitted classes are listed


def test_an_unreachable_server_is_a_page_that_says_so(world: World) -> None:
    from spurguard.ui.server import UiServer, UiSettings

    with Client("127.0.0.1:1", timeout=2, retries=0) as nowhere, UiServer(nowhere, UiSettings(port=0)) as page:
        try:
            urllib.request.urlopen(page.url, timeout=30)
            raise AssertionError("the page answered 200 without a server")
        except urllib.error.HTTPError as error:
            text = error.read().decode()
            assert error.code == 503
    assert "cannot be reached" in text and "127.0.0.1:1" in text and "Traceback" not in text


def test_the_command_says_what_it_needs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as shown:
        cli_main(["ui", "--help"])
    assert shown.value.code == 0
    text = capsys.readouterr().out
    assert "--port PORT" in text and "--top N" in text and "s spurious" in text
    real_import = __import__("importlib").import_module

    def without_ui(name: str, *args: Any) -> Any:
        if name.startswith("spurguard.ui"):
            raise ImportError("No module named 'starlette'")
        return real_import(name, *args)

    monkeypatch.setattr("importlib.import_module", without_ui)
    with pytest.raises(SystemExit) as refused:
        cli_main(["--server", "127.0.0.1:1", "ui"])
    assert refused.value.code == 2
    assert "pip install 'spurguard[ui]'" in capsys.readouterr().err


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_the_command_serves_a_tls_server_with_the_environments_token_until_stopped(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """`spurguard ui` as a user runs it: a TLS server with tokens, the token from SPURGUARD_TOKEN,
    any free port (printed), and Ctrl-C or SIGTERM a clean stop with exit status 0."""
    pki = make_pki(tmp_path / "pki")
    role, token = PEOPLE["alice"]
    tokens = tmp_path / "tokens.toml"
    auth.write_tokens(tokens, [auth.Token.of("alice", role, token)])  # type: ignore[arg-type]
    config = ServerConfig(models=(MODEL,), store=tmp_path / "store", port=0, device="cpu", grace_s=1.0,
                          tls_cert=pki / "server.pem", tls_key=pki / "server.key", auth_tokens=tokens)
    with BackgroundServer(config) as server:
        ui = subprocess.Popen(
            [sys.executable, "-m", "spurguard", "ui", "--server", server.address, "--tls-ca", str(pki / "ca.pem"),
             "--port", "0"],
            stderr=subprocess.PIPE, text=True, env={**os.environ, "SPURGUARD_TOKEN": token},
        )
        try:
            line = ui.stderr.readline() if ui.stderr else ""
            assert "warning" not in line  # loopback: nothing to warn about
            found = re.search(r"spurguard ui: open (http://127\.0\.0\.1:\d+/) ", line)
            assert found, line
            with urllib.request.urlopen(found.group(1), timeout=30) as reply:
                page = reply.read().decode()
            assert f'href="/models/{MODEL}"' in page and "not fitted" in page
            ui.send_signal(stop)
            _, rest = ui.communicate(timeout=30)
        finally:
            ui.kill()
    assert ui.returncode == 0, rest


def test_the_classes_page_counts_components_on_a_server_without_fit_classes() -> None:
    """An older server's GetModel has no fit_classes: the page asks GetComponents per class."""
    asked: list[int] = []

    class OlderServer:
        target = "old:1"

        def get_model(self, model: str) -> t.ModelInfo:
            return t.ModelInfo(model, "torch", "cpu", 3, 8, 16, "d", True, True, "fit-1", (0, 2), 8,
                               tuple(t.ClassInfo(k, f"c{k}", None) for k in range(3)))

        def list_labels(self, model: str) -> list[t.LabelRecord]:
            return [t.LabelRecord(model, "fit-1", 2, 0, "spurious", "", None)]

        def get_components(self, model: str, k: int, *, top: int) -> t.Components:
            asked.append(k)
            return t.Components(model, k, "fit-1", 10, 5 + k, 5.0, 0.0, ())

    from spurguard.ui.gateway import model_page

    page = model_page(OlderServer(), "m", top=4)  # type: ignore[arg-type]
    assert sorted(asked) == [0, 2]
    assert [(c["index"], c["num_components"], c["shown"], c["spurious"]) for c in page["classes"]] == [
        (0, 5, 4, []), (2, 7, 4, [0])]


def test_the_command_warns_when_the_page_listens_beyond_loopback() -> None:
    ui = subprocess.Popen([sys.executable, "-m", "spurguard", "ui", "--server", "127.0.0.1:1", "--host", "0.0.0.0",
                           "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        warning = ui.stderr.readline() if ui.stderr else ""
        opened = ui.stderr.readline() if ui.stderr else ""
        ui.send_signal(signal.SIGTERM)
        ui.communicate(timeout=30)
    finally:
        ui.kill()
    assert warning.startswith("spurguard ui: warning: listening on 0.0.0.0: whoever reaches this port labels with")
    assert opened.startswith("spurguard ui: open http://127.0.0.1:") and ui.returncode == 0


def test_a_bug_of_the_ui_is_a_page_in_words_not_a_traceback(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from spurguard.ui import gateway

    def broken(*args: object) -> None:
        raise KeyError("a field nobody expected")

    monkeypatch.setattr(gateway, "models_page", broken)
    with labelling_page(world, "alice") as page:
        try:
            urllib.request.urlopen(page.url, timeout=30)
            raise AssertionError("a broken page answered 200")
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
    assert status == 500 and "The labelling page itself failed; nothing was changed on the server." in text
    assert "KeyError" in text and "Traceback" not in text and "a field nobody expected" not in text
