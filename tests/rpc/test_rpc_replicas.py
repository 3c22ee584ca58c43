"""Replicas on PostgreSQL (`serve --labels postgresql://…`): two servers on one database and one
store volume. What one labels or fits the other applies at once (LISTEN/NOTIFY, not polling:
--store-poll-s is an hour here); a kill -9 loses nothing committed; the database going away is
UNAVAILABLE, and its return is picked up by itself."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from spurguard.client import Client, SpurguardClientError
from spurguard.server.errors import Unavailable
from spurguard.server.rpc.app import BackgroundServer, ServerConfig
from spurguard.server.rpc.process import ServerProcess

from rpc_support import random_png, write_data_root
from backends_support import write_tiny_model_dir  # rpc_support put it on the path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
from postgres_support import PostgresServer, postgres_server  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")

NO_POLL_S = 3600.0  # whatever reaches the other server in these tests, NOTIFY brought it
SLOTS = [(k, c) for k in (0, 1) for c in (0, 1)]  # (class, component) of the fit's components
IMAGES = [(f"img-{i}", random_png(np.random.default_rng(i))) for i in range(2)]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_data_root(tmp_path_factory.mktemp("data"), 3, 6, spurious=0)


def _config(model_dir: Path, store: Path, url: str, data: Path) -> ServerConfig:
    return ServerConfig(models=(str(model_dir),), store=store, labels=url, port=0, device="cpu",
                        data_roots=(data,), store_poll_s=NO_POLL_S)


def _server_process(model_dir: Path, store: Path, url: str, data: Path) -> ServerProcess:
    return ServerProcess(["--model", str(model_dir), "--store", str(store), "--labels", url, "--device", "cpu",
                          "--data-root", str(data), "--store-poll-s", str(NO_POLL_S)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})


def _scored(client: Client) -> tuple[str | None, dict[tuple[int, int], str]]:
    """What the server's next Score applies: its fit, and the label of every (class, component)."""
    labels, fit_id = {}, None
    for k in (0, 1):
        for result in client.score("tiny", IMAGES, class_index=k, top=0):
            assert result.error is None, result.error
            fit_id = result.fit_id
            labels.update({(k, c.index): c.label for c in result.components})
    return fit_id, labels


def _within(seconds: float, done: Callable[[], bool]) -> float:
    """How long until `done()` (asserted to come within `seconds`)."""
    started = time.monotonic()
    while not done():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - started


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SpurguardClientError) as caught:
        call()
    return caught.value.code, caught.value.details


def test_replicas_apply_each_others_labels_and_fits_at_once_and_a_kill_9_loses_nothing(
    postgres: PostgresServer, model_dir: Path, data: Path, tmp_path: Path
) -> None:
    url, store = postgres.new_database(), tmp_path / "store"
    first = _server_process(model_dir, store, url, data)
    try:
        with BackgroundServer(_config(model_dir, store, url, data)) as second, \
                Client(first.target, timeout=30) as a, Client(second.address, timeout=30) as b:
            *_, summary = a.fit("tiny", str(data / "train"), classes=[0, 1], num_components=2, job_id="fit-1")
            _within(1.0, lambda: _scored(b)[0] == summary.fit_id)  # a fit committed on one: the other's next Score

            a.label("tiny", 1, 1, "spurious", note="made on the first")
            _within(1.0, lambda: _scored(b)[1][(1, 1)] == "spurious")
            b.label("tiny", 0, 1, "inconsistent")
            _within(1.0, lambda: _scored(a)[1][(0, 1)] == "inconsistent")
            # a watch on one replica is pushed the other's writes, a note alone too (no polling)
            with b.watch_labels("tiny", class_index=1) as watched, ThreadPoolExecutor(1) as pool:
                assert [r.note for r in pool.submit(next, watched).result(timeout=10).labels] == ["made on the first"]
                written = time.monotonic()
                a.label("tiny", 1, 1, "spurious", note="the same label, a new note")
                pushed = pool.submit(next, watched).result(timeout=5)
                assert [r.note for r in pushed.labels] == ["the same label, a new note"]
                assert time.monotonic() - written < 1.0

            # kill -9 the first while it is labelling: every label it acknowledged is kept.
            acked: dict[tuple[int, int], int] = {}  # slot -> index of its last acknowledged write
            attempted: dict[tuple[int, int], int] = {}
            stop = threading.Event()

            def label_forever() -> None:
                for i in range(10_000):
                    slot = SLOTS[i % len(SLOTS)]
                    attempted[slot] = i
                    try:
                        a.label("tiny", *slot, ("spurious", "not_spurious")[i % 2], note=f"write {i}")
                    except SpurguardClientError:
                        return
                    acked[slot] = i
                    if stop.is_set():
                        return

            writer = threading.Thread(target=label_forever)
            writer.start()
            _within(30.0, lambda: sum(acked.values()) > 40)
            os.kill(first.process.pid, signal.SIGKILL)
            stop.set()
            writer.join(timeout=30)
            assert first.process.wait(timeout=10) == -signal.SIGKILL

            def written(client: Client) -> dict[tuple[int, int], int]:
                return {(r.class_index, r.component): int(r.note.split()[1])
                        for r in client.list_labels("tiny") if r.note.startswith("write ")}

            kept = written(b)
            assert kept.keys() == set(SLOTS)
            for slot in SLOTS:  # the last acknowledged write, or the one in flight at the kill
                assert acked[slot] <= kept[slot] <= attempted[slot], (slot, acked, kept, attempted)
            expected = {slot: ("spurious", "not_spurious")[i % 2] for slot, i in kept.items()}
            _within(1.0, lambda: _scored(b) == (summary.fit_id, expected))  # the other serves on, with all of them

            restarted = _server_process(model_dir, store, url, data)
            try:
                with Client(restarted.target, timeout=30) as again:
                    assert written(again) == kept and _scored(again) == (summary.fit_id, expected)
                    assert again.get_job("fit-1").state == "succeeded"
                    again.label("tiny", 0, 0, "spurious", note="after the restart")
                    _within(1.0, lambda: _scored(b)[1][(0, 0)] == "spurious")
            finally:
                restarted.stop()
    finally:
        first.stop()


def test_without_the_database_labels_are_unavailable_and_its_return_is_picked_up(
    model_dir: Path, data: Path, tmp_path: Path
) -> None:
    with postgres_server() as own:  # a server of its own: this test stops it
        url, store = own.new_database(), tmp_path / "store"
        with BackgroundServer(_config(model_dir, store, url, data)) as one, \
                BackgroundServer(_config(model_dir, store, url, data)) as two, \
                Client(one.address, timeout=30) as a, Client(two.address, timeout=30) as b:
            *_, summary = a.fit("tiny", str(data / "train"), classes=[0, 1], num_components=2)
            _within(1.0, lambda: _scored(b)[0] == summary.fit_id)
            own.stop()
            code, message = _code(lambda: a.label("tiny", 1, 0, "spurious"))
            assert code == grpc.StatusCode.UNAVAILABLE and "label database" in message, message
            assert "password" not in message
            assert _code(lambda: b.list_labels("tiny"))[0] == grpc.StatusCode.UNAVAILABLE
            assert _code(lambda: b.get_job("nope"))[0] == grpc.StatusCode.UNAVAILABLE
            assert _code(lambda: list(b.fit("tiny", str(data / "train"), classes=[2], num_components=2)))[0] \
                == grpc.StatusCode.UNAVAILABLE  # never INTERNAL
            assert _scored(b) == (summary.fit_id, {slot: "unlabeled" for slot in SLOTS})  # scoring goes on

            own.start()
            a.label("tiny", 1, 0, "spurious", note="the database is back")  # a new connection, no restart
            _within(15.0, lambda: _scored(b)[1][(1, 0)] == "spurious")  # its listener reconnected
            b.label("tiny", 1, 1, "not_spurious")
            _within(1.0, lambda: _scored(a)[1][(1, 1)] == "not_spurious")  # and hears at once again
        own.stop()
        with pytest.raises(Unavailable, match="label database"):  # a server cannot start without it
            BackgroundServer(_config(model_dir, store, url, data)).start()
