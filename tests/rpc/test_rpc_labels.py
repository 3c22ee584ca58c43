"""Label authors and the label history over gRPC: with `--auth-tokens` each label records the
name of the token that set it, and ListLabels' `history` keeps every write (SPEC section 3,
Auth; ListLabelsResponse.history).

One in-process server (BackgroundServer, port 0) with tokens serves the tiny model directory,
fitted once for the module by the admin token; two tokens of role label are the two labellers.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from spurguard.client import Client, FitSummary, LabelList, ListLabelsRequest, SpurguardClientError
from spurguard.server.rpc.app import BackgroundServer, ServerConfig

from rpc_support import token_entry, write_data_root

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from backends_support import CLASSES, write_tiny_model_dir  # noqa: E402

COMPONENTS = 4
TOKENS = {"alice": ("label", "tok-alice"), "bob": ("label", "tok-bob"), "root": ("admin", "tok-root")}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@contextmanager
def fitted_server(tmp: Path, grace_s: float = 1.0) -> Iterator[BackgroundServer]:
    """The tiny model, fitted by the admin token on classes 0 and 1."""
    tokens = tmp / "tokens.toml"
    tokens.write_text("\n".join(token_entry(name, role, token) for name, (role, token) in TOKENS.items()))
    config = ServerConfig(
        models=(str(write_tiny_model_dir(tmp / "model")),), store=tmp / "store", port=0, device="cpu",
        data_roots=(write_data_root(tmp / "data", CLASSES, 8, spurious=0),), auth_tokens=tokens, grace_s=grace_s,
    )
    with BackgroundServer(config) as running:
        with Client(running.address, timeout=30, token=TOKENS["root"][1]) as admin:
            *_, summary = admin.fit("tiny", str(tmp / "data" / "train"), classes=[0, 1], num_components=COMPONENTS)
        assert isinstance(summary, FitSummary)
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    with fitted_server(tmp_path_factory.mktemp("labels")) as running:
        yield running


def client(server: BackgroundServer, name: str) -> Client:
    return Client(server.address, timeout=30, retries=0, token=TOKENS[name][1])


def test_two_labellers_the_later_write_is_the_label_and_the_history_keeps_both(server: BackgroundServer) -> None:
    with client(server, "alice") as alice, client(server, "bob") as bob:
        first = alice.label("tiny", 0, 1, "spurious", note="watermark in the corner")
        assert first.author == "alice"
        assert bob.label("tiny", 0, 1, "not_spurious", note="it is the object").author == "bob"
        alice.label("tiny", 0, 2, "inconsistent", note="some")

        (label,) = alice.list_labels("tiny", class_index=0, component=1)
        assert (label.label, label.note, label.author) == ("not_spurious", "it is the object", "bob")
        history = alice.label_history("tiny", class_index=0, component=1)
        assert [(x.label, x.note, x.author) for x in history] == [
            ("spurious", "watermark in the corner", "alice"), ("not_spurious", "it is the object", "bob")]
        assert history[0] == first

        cleared = bob.label("tiny", 0, 1, "unlabeled")
        assert (cleared.author, cleared.updated) == ("bob", None)  # the label's state: unlabeled has no time
        assert bob.list_labels("tiny", class_index=0, component=1) == []
        last = bob.label_history("tiny", class_index=0, component=1)[-1]
        assert (last.label, last.author) == ("unlabeled", "bob") and last.updated is not None  # the write has one
        assert [(x.component, x.author) for x in bob.label_history("tiny", class_index=0)] == [
            (1, "alice"), (1, "bob"), (2, "alice"), (1, "bob")]  # write order
        bob.label("tiny", 0, 2, "unlabeled")


def test_concurrent_labellers_each_get_their_own_name(server: BackgroundServer) -> None:
    with client(server, "alice") as alice, client(server, "bob") as bob:
        callers = {"alice": alice, "bob": bob}

        def write(i: int) -> str:
            name = ("alice", "bob")[i % 2]
            return callers[name].label("tiny", 1, i % COMPONENTS, "spurious", note=f"{name} {i}").author

        with ThreadPoolExecutor(8) as pool:
            authors = list(pool.map(write, range(24)))
        assert authors == [("alice", "bob")[i % 2] for i in range(24)]
        history = alice.label_history("tiny", class_index=1)
        assert len(history) == 24 and all(x.note.split()[0] == x.author for x in history)
        newest = {x.component: x for x in history}
        assert alice.list_labels("tiny", class_index=1) == [newest[c] for c in range(COMPONENTS)]


def test_a_component_filter_needs_its_class(server: BackgroundServer) -> None:
    with client(server, "alice") as alice:
        with pytest.raises(SpurguardClientError) as alone:
            alice.list_labels("tiny", component=1)
        assert alone.value.code == grpc.StatusCode.INVALID_ARGUMENT and "needs class_index" in alone.value.details
        with pytest.raises(SpurguardClientError) as beyond:
            alice.label_history("tiny", class_index=0, component=COMPONENTS)
        assert beyond.value.code == grpc.StatusCode.NOT_FOUND and f"no component {COMPONENTS}" in beyond.value.details


# ---- WatchLabels ----


def _next_within(snapshots: Iterator[LabelList], seconds: float) -> LabelList:
    """The next snapshot, from a thread so that a stream that sends nothing fails the test."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(next, snapshots).result(timeout=seconds)


def test_a_watch_sends_the_labels_now_and_again_on_every_change_by_anyone(server: BackgroundServer) -> None:
    k, c = 1, COMPONENTS - 1
    with client(server, "alice") as alice, client(server, "bob") as bob, \
            alice.watch_labels("tiny", class_index=k, history=True) as snapshots:
        first = _next_within(snapshots, 10)
        assert first == alice._label_list(ListLabelsRequest("tiny", k, history=True))  # what ListLabels says
        bob.label("tiny", k, c, "spurious", note="a stamp")
        second = _next_within(snapshots, 2)
        (mine,) = [r for r in second.labels if r.component == c]
        assert (mine.label, mine.note, mine.author) == ("spurious", "a stamp", "bob")
        assert len(second.history) == len(first.history) + 1
        alice.label("tiny", 0, c, "inconsistent")  # another class: nothing for this watch
        bob.label("tiny", k, c, "spurious", note="a stamp, lower left")  # the note alone changes
        third = _next_within(snapshots, 2)
        assert [r.note for r in third.labels if r.component == c] == ["a stamp, lower left"]
        assert [r.note for r in third.history if r.component == c][-2:] == ["a stamp", "a stamp, lower left"]
        alice.label("tiny", 0, c, "unlabeled")
        bob.label("tiny", k, c, "unlabeled")
        assert c not in {r.component for r in _next_within(snapshots, 2).labels}


def test_a_watch_of_an_impossible_selection_is_refused_at_once(server: BackgroundServer) -> None:
    with client(server, "alice") as alice:
        with pytest.raises(SpurguardClientError) as refused:
            next(alice.watch_labels("tiny", component=1))  # a component needs its class
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(SpurguardClientError) as missing:
            next(alice.watch_labels("no-such-model"))
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_watches_end_when_the_server_stops_answering_not_at_the_end_of_grace(tmp_path: Path) -> None:
    """A watch never ends by itself; on shutdown it must end when new calls are refused, or every
    open labelling page would hold a draining server for its whole grace period."""
    with fitted_server(tmp_path, grace_s=30.0) as running, client(running, "alice") as alice:
        snapshots = alice.watch_labels("tiny", class_index=0)
        _next_within(snapshots, 10)
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            stopping = pool.submit(running.stop)
            assert next(snapshots, "ended") == "ended"  # the stream ends OK: the client watches again elsewhere
            ended = time.monotonic() - started
            stopping.result(timeout=30)
        stopped = time.monotonic() - started
    assert ended < 5 and stopped < 10, (ended, stopped)


def test_get_model_lists_each_fitted_class_with_its_images_and_components(server: BackgroundServer) -> None:
    """What a labelling page's progress needs in one call (ModelInfo.fit_classes, GetModel only)."""
    with client(server, "alice") as alice:
        info = alice.get_model("tiny")
        expected = []
        for k in info.fitted_classes:
            components = alice.get_components("tiny", k, top=1)
            expected.append((k, components.images, components.num_components))
        assert [(c.class_index, c.images, c.num_components) for c in info.fit_classes] == expected
        assert [c.class_index for c in info.fit_classes] == [0, 1]
        assert all(m.fit_classes == () for m in alice.list_models())  # kept small, like `classes`
