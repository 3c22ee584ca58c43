"""The store: exact round trips, digest isolation, crash safety, resume, extension and labels.

The label and job tests run on both databases (`BOTH`): SQLite in the store, and PostgreSQL
(a throwaway server, postgres_support; a new database per test)."""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np
import psycopg
import pytest
import safetensors.numpy

import spurguard.server.store as store_pkg
import spurguard.server.store.postgres as postgres_store
from spurguard import vocab
from spurguard.server.engine.components import ClassComponents
from spurguard.server.errors import FailedPrecondition, InvalidInput, NotFound
from spurguard.server.store import Store
from spurguard.server.store.labels import Label
from spurguard.server.store.changes import Change

from postgres_support import PostgresServer, postgres_server

MODEL = "mycnn"
DIGEST = "a" * 64
OTHER_DIGEST = "b" * 64
DIM = 16
NUM = 4
T = TypeVar("T")


def components(k: int, *, num: int = NUM, images: int = 9, seed: int = 0) -> ClassComponents:
    """Random but reproducible components of class k; `num` may be below NUM (small classes)."""
    rng = np.random.default_rng([seed, k])
    vectors, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    return ClassComponents(
        class_index=k,
        count=images,
        mean=rng.normal(size=DIM),
        eigenvalues=np.sort(rng.random(num))[::-1].copy(),
        vectors=vectors[:num].copy(),
        total_variance=float(rng.random() * 10),
        image_ids=[f"{k}/img_{i:03d}.png" for i in range(images)],
        alphas=rng.normal(size=(images, num)).astype(np.float32),
    )


def assert_same(a: ClassComponents, b: ClassComponents) -> None:
    assert (a.class_index, a.count, a.total_variance, a.image_ids) == (
        b.class_index, b.count, b.total_variance, b.image_ids,
    )
    for name in ("mean", "eigenvalues", "vectors", "alphas"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


def write_fit(store: Store, classes: list[int], *, seed: int = 0) -> str:
    with store.begin_fit(MODEL, DIGEST, dataset_root="/data/train", num_components=NUM, feature_dim=DIM) as w:
        for k in classes:
            w.add_class(components(k, seed=seed))
        return w.commit().fit_id


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def labels_url(request: pytest.FixtureRequest) -> str:
    """`--labels` of the store under test: sqlite unless parametrized (BOTH); a fresh database."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return "sqlite"
    return request.getfixturevalue("postgres").new_database()


BOTH = pytest.mark.parametrize("labels_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def store(tmp_path: Path, labels_url: str) -> Iterator[Store]:
    opened = Store(tmp_path / "store", labels_url)
    yield opened
    opened.close()


def fit_dir(store: Store, fit_id: str) -> Path:
    return store.root / "models" / MODEL / DIGEST / "fits" / fit_id


# ---- fits ----


def test_round_trip_is_exact(store: Store) -> None:
    originals = [
        components(0),
        components(3, num=2, images=3),  # a small class keeps fewer than L components
        components(7, num=0, images=1),  # one image: no components at all
        ClassComponents(5, 0, np.zeros(DIM), np.zeros(0), np.zeros((0, DIM)), 0.0),  # no fit images stored
    ]
    info = {"preprocess": {"size": 224, "mean": [0.485, 0.456, 0.406]}, "backend": "torch"}
    with store.begin_fit(
        MODEL, DIGEST, dataset_root=Path("/data/train"), num_components=NUM, feature_dim=DIM, info=info
    ) as writer:
        for c in originals:
            writer.add_class(c)
        meta = writer.commit()

    fit = store.load_fit(MODEL, DIGEST)
    assert fit.meta == meta
    assert (meta.model, meta.digest, meta.dataset_root, meta.num_components, meta.feature_dim) == (
        MODEL, DIGEST, "/data/train", NUM, DIM,
    )
    assert meta.classes == (0, 3, 5, 7) and meta.info == info and meta.base_fit_id is None
    assert datetime.fromisoformat(meta.created).utcoffset() == timezone.utc.utcoffset(None)
    for c in originals:
        assert_same(fit.components(c.class_index), c)
        assert fit.summary(c.class_index).num_components == c.vectors.shape[0]
    assert store.current_fit_id(MODEL, DIGEST) == meta.fit_id
    assert store.list_fits(MODEL, DIGEST) == [meta]
    assert store.pending_fits(MODEL, DIGEST) == []
    with pytest.raises(NotFound, match="class 1 is not fitted"):
        fit.components(1)


def test_classes_load_lazily_and_are_checked(store: Store) -> None:
    fit_id = write_fit(store, [0, 1, 2])
    fit = store.load_fit(MODEL, DIGEST)
    (fit_dir(store, fit_id) / "class_1.safetensors").unlink()
    assert_same(fit.components(0), components(0))
    with pytest.raises(FailedPrecondition, match="missing file class_1.safetensors"):
        fit.components(1)
    (fit_dir(store, fit_id) / "class_2.safetensors").write_bytes(
        safetensors.numpy.save({"mean": np.zeros(DIM)})
    )
    with pytest.raises(FailedPrecondition, match="checksum"):
        fit.components(2)


def test_changed_weights_never_reuse_another_digests_fit(store: Store) -> None:
    write_fit(store, [0, 1])
    message = r"model mycnn has no fit for its current weights \(digest bbbb.*run fit"
    with pytest.raises(FailedPrecondition, match=message):
        store.load_fit(MODEL, OTHER_DIGEST)
    with pytest.raises(FailedPrecondition, match="no fit for its current weights"):
        store.spurious_components(MODEL, OTHER_DIGEST)
    with pytest.raises(FailedPrecondition, match="no fit for its current weights"):
        store.set_label(MODEL, OTHER_DIGEST, 0, 0, "spurious")
    assert store.current_fit_id(MODEL, OTHER_DIGEST) is None
    assert store.list_fits(MODEL, OTHER_DIGEST) == []
    assert store.load_fit(MODEL, DIGEST).classes == (0, 1)


@pytest.mark.parametrize("name", ["../evil", "", ".hidden", "a/b", 3])
def test_names_cannot_escape_the_root(store: Store, name: object) -> None:
    with pytest.raises(InvalidInput):
        store.load_fit(name, DIGEST)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        store.load_fit(MODEL, DIGEST, fit_id=name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"mean": np.zeros(DIM + 1)}, "mean has shape"),
        ({"alphas": components(0).alphas[:3]}, "alphas has shape"),
        ({"eigenvalues": np.full(NUM, np.nan)}, "non-finite"),
        ({"class_index": -1}, "class_index"),
        ({"vectors": np.zeros((NUM + 1, DIM)), "eigenvalues": np.zeros(NUM + 1), "alphas": np.zeros((9, NUM + 1))},
         f"at most {NUM}"),
    ],
)
def test_malformed_components_are_refused_before_writing(store: Store, changes: dict, match: str) -> None:
    with store.begin_fit(MODEL, DIGEST, dataset_root="/d", num_components=NUM, feature_dim=DIM) as writer:
        with pytest.raises(InvalidInput, match=match):
            writer.add_class(dataclasses.replace(components(0), **changes))
        assert writer.done_classes == []


def test_fit_settings_are_validated(store: Store) -> None:
    with pytest.raises(InvalidInput, match="JSON"):
        store.begin_fit(
            MODEL, DIGEST, dataset_root="/d", num_components=NUM, feature_dim=DIM, info={"x": object()}
        )
    with pytest.raises(InvalidInput, match="num_components"):
        store.begin_fit(MODEL, DIGEST, dataset_root="/d", num_components=0, feature_dim=DIM)


def test_commit_checks_classes(store: Store) -> None:
    with store.begin_fit(MODEL, DIGEST, dataset_root="/d", num_components=NUM, feature_dim=DIM) as writer:
        with pytest.raises(FailedPrecondition, match="nothing to commit"):
            writer.commit()
        writer.add_class(components(0))
        with pytest.raises(FailedPrecondition, match=r"classes \[1, 2\] are not written"):
            writer.commit(expected_classes=[0, 1, 2])
        writer.add_class(components(0, seed=9))  # a class written again replaces the first version
        writer.commit(expected_classes=[0])
        with pytest.raises(FailedPrecondition, match="closed"):
            writer.add_class(components(1))
    assert_same(store.load_fit(MODEL, DIGEST).components(0), components(0, seed=9))


def test_crash_in_atomic_write_leaves_previous_state(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    old = write_fit(store, [0, 1])
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        if Path(str(dst)).name == "current.json":
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with store.begin_fit(MODEL, DIGEST, dataset_root="/d", num_components=NUM, feature_dim=DIM) as writer:
        writer.add_class(components(0, seed=1))
        with pytest.raises(OSError, match="simulated crash"):
            writer.commit()
    monkeypatch.undo()

    assert store.current_fit_id(MODEL, DIGEST) == old
    assert_same(store.load_fit(MODEL, DIGEST).components(0), components(0))
    digest_dir = store.root / "models" / MODEL / DIGEST
    assert not [p for p in digest_dir.iterdir() if p.name.endswith(".tmp")]
    # The manifest landed before the crash: the new fit is complete, just not in use yet.
    assert {m.fit_id for m in store.list_fits(MODEL, DIGEST)} == {old, writer.fit_id}
    store.set_current(MODEL, DIGEST, writer.fit_id)
    assert_same(store.load_fit(MODEL, DIGEST).components(0), components(0, seed=1))


CRASHING_WRITER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_store import DIGEST, DIM, MODEL, NUM, components
from spurguard.server.store import Store
from spurguard.server.store.labels import Label
store_root, fit_id, kill_at = sys.argv[2:5]
real_replace = os.replace

def replace(src, dst):
    if Path(str(dst)).name == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

os.replace = replace
writer = Store(store_root).begin_fit(MODEL, DIGEST, dataset_root="/d", num_components=NUM, feature_dim=DIM,
                                     fit_id=fit_id)
for k in range(4):
    writer.add_class(components(k, seed=1))
writer.commit()
sys.exit(3)
"""


def crash_writer(store: Store, fit_id: str, kill_at: str) -> int:
    """Run a fit in a child process that is SIGKILLed just before `kill_at` would be renamed into
    place; its return code. A fresh interpreter, not a fork: forking a process that runs thread
    pools (torch, ONNX Runtime, grpc from other tests) can leave the child stuck on a lock."""
    here = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", CRASHING_WRITER, here, str(store.root), fit_id, kill_at],
                          capture_output=True, text=True, timeout=120)
    return done.returncode


@pytest.mark.parametrize(
    ("kill_at", "done", "committed"),
    [
        ("class_2.safetensors", [0, 1], False),  # mid-class: tensors fsynced in a temp file
        ("class_2.json", [0, 1], False),  # tensors in place, record not yet: class 2 not done
        ("manifest.json", [0, 1, 2, 3], False),  # every class done, commit cut short
        ("current.json", [0, 1, 2, 3], True),  # committed, not yet in use
    ],
)
def test_killed_writer_leaves_old_fit_and_resumes(
    store: Store, kill_at: str, done: list[int], committed: bool
) -> None:
    old = write_fit(store, [0, 1])
    assert crash_writer(store, "F1", kill_at) == -signal.SIGKILL

    assert store.current_fit_id(MODEL, DIGEST) == old
    fit = store.load_fit(MODEL, DIGEST)
    assert fit.classes == (0, 1)
    assert_same(fit.components(1), components(1))
    visible = {p.name for p in fit_dir(store, "F1").iterdir() if not p.name.startswith(".")}
    assert {f"class_{k}.json" for k in done} <= visible
    assert "class_3.json" not in visible or 3 in done
    if kill_at == "class_2.safetensors":
        assert "class_2.safetensors" not in visible  # the partial file never got its final name
    if committed:
        assert store.pending_fits(MODEL, DIGEST) == []
        store.set_current(MODEL, DIGEST, "F1")
    else:
        assert store.pending_fits(MODEL, DIGEST) == ["F1"]
        assert [m.fit_id for m in store.list_fits(MODEL, DIGEST)] == [old]
        with store.resume_fit(MODEL, DIGEST, "F1") as writer:
            assert writer.done_classes == done
            assert not [p for p in fit_dir(store, "F1").iterdir() if p.name.endswith(".tmp")]
            for k in range(4):
                if k not in writer.done_classes:
                    writer.add_class(components(k, seed=1))
            writer.commit(expected_classes=range(4))
    fit = store.load_fit(MODEL, DIGEST)
    assert fit.fit_id == "F1" and fit.classes == (0, 1, 2, 3)
    for k in range(4):
        assert_same(fit.components(k), components(k, seed=1))


def test_resume_rules(store: Store) -> None:
    kwargs = dict(dataset_root="/d", num_components=NUM, feature_dim=DIM, info={"size": 224})
    writer = store.begin_fit(MODEL, DIGEST, fit_id="job-1", **kwargs)
    writer.add_class(components(0))
    with pytest.raises(FailedPrecondition, match="being written by another job"):
        store.resume_fit(MODEL, DIGEST, "job-1")
    writer.close()
    with pytest.raises(FailedPrecondition, match="other settings"):
        store.begin_fit(MODEL, DIGEST, fit_id="job-1", **{**kwargs, "num_components": NUM + 1})
    with store.begin_fit(MODEL, DIGEST, fit_id="job-1", **kwargs) as again:  # same settings: resumes
        assert again.done_classes == [0]
        again.commit()
    with pytest.raises(FailedPrecondition, match="already committed"):
        store.begin_fit(MODEL, DIGEST, fit_id="job-1", **kwargs)
    with pytest.raises(NotFound, match="no unfinished fit"):
        store.resume_fit(MODEL, DIGEST, "job-2")

    abandoned = store.begin_fit(MODEL, DIGEST, fit_id="job-3", **kwargs)
    abandoned.add_class(components(1))
    abandoned.discard()
    assert not fit_dir(store, "job-3").exists() and store.pending_fits(MODEL, DIGEST) == []
    assert store.current_fit_id(MODEL, DIGEST) == "job-1"


@BOTH
def test_extend_shares_files_and_carries_labels_of_unchanged_classes(store: Store) -> None:
    base = write_fit(store, [0, 1])
    store.set_label(MODEL, DIGEST, 0, 1, "spurious", "watermark")
    store.set_label(MODEL, DIGEST, 1, 0, "spurious")
    with store.extend_fit(MODEL, DIGEST) as writer:
        assert writer.done_classes == [0, 1] and writer.settings.base_fit_id == base
        writer.add_class(components(2))
        writer.add_class(components(1, seed=5))  # refitted: its old labels must not apply
        meta = writer.commit()
    assert meta.classes == (0, 1, 2) and meta.base_fit_id == base
    assert store.current_fit_id(MODEL, DIGEST) == meta.fit_id
    new, old = fit_dir(store, meta.fit_id), fit_dir(store, base)
    assert (new / "class_0.safetensors").stat().st_ino == (old / "class_0.safetensors").stat().st_ino
    fit = store.load_fit(MODEL, DIGEST)
    assert_same(fit.components(0), components(0))
    assert_same(fit.components(1), components(1, seed=5))
    assert_same(store.load_fit(MODEL, DIGEST, base).components(1), components(1))
    assert store.spurious_components(MODEL, DIGEST) == {0: [1]}
    old_labels = store.list_labels(MODEL, DIGEST, fit_id=base)
    assert [(x.class_index, x.component) for x in old_labels] == [(0, 1), (1, 0)]


# ---- labels ----


@BOTH
def test_labels_set_overwrite_filter_and_clear(store: Store) -> None:
    fit_id = write_fit(store, [0, 1])
    first = store.set_label(MODEL, DIGEST, 0, 2, "spurious", "text in the corner")
    assert (first.fit_id, first.label, first.note) == (fit_id, "spurious", "text in the corner")
    assert datetime.fromisoformat(first.updated or "").utcoffset() == timezone.utc.utcoffset(None)
    second = store.set_label(MODEL, DIGEST, 0, 2, "inconsistent", "on second look")
    assert store.list_labels(MODEL, DIGEST) == [second]
    store.set_label(MODEL, DIGEST, 1, 0, "spurious")
    store.set_label(MODEL, DIGEST, 1, 3, "not_spurious")

    assert [x.component for x in store.list_labels(MODEL, DIGEST, class_index=1)] == [0, 3]
    assert [x.class_index for x in store.list_labels(MODEL, DIGEST, label="spurious")] == [1]
    assert store.spurious_components(MODEL, DIGEST) == {1: [0]}
    unlabeled = store.list_labels(MODEL, DIGEST, class_index=1, label="unlabeled")
    assert [(x.component, x.label, x.updated) for x in unlabeled] == [
        (1, "unlabeled", None),
        (2, "unlabeled", None),
    ]
    assert len(store.list_labels(MODEL, DIGEST, label="unlabeled")) == 2 * NUM - 3

    cleared = store.set_label(MODEL, DIGEST, 1, 0, "unlabeled")
    assert cleared.label == "unlabeled"
    assert store.spurious_components(MODEL, DIGEST) == {}
    assert [x.component for x in store.list_labels(MODEL, DIGEST, class_index=1)] == [3]


@BOTH
def test_label_validation(store: Store) -> None:
    write_fit(store, [0])
    assert vocab.LABELS == ("spurious", "not_spurious", "inconsistent", "unlabeled")  # what the store accepts
    with pytest.raises(InvalidInput, match="invalid label 'harmful'"):
        store.set_label(MODEL, DIGEST, 0, 0, "harmful")
    with pytest.raises(InvalidInput, match="invalid label"):
        store.list_labels(MODEL, DIGEST, label="harmful")
    with pytest.raises(NotFound, match="class 5 is not fitted"):
        store.set_label(MODEL, DIGEST, 5, 0, "spurious")
    with pytest.raises(NotFound, match="class 5 is not fitted"):
        store.list_labels(MODEL, DIGEST, class_index=5)
    with pytest.raises(NotFound, match="no component 4"):
        store.set_label(MODEL, DIGEST, 0, NUM, "spurious")
    with pytest.raises(InvalidInput, match="non-negative"):
        store.set_label(MODEL, DIGEST, 0, -1, "spurious")
    with pytest.raises(InvalidInput, match="note"):
        store.set_label(MODEL, DIGEST, 0, 0, "spurious", "x" * 20_000)
    with pytest.raises(NotFound, match="no committed fit 'nope'"):
        store.set_label(MODEL, DIGEST, 0, 0, "spurious", fit_id="nope")
    assert store.list_labels(MODEL, DIGEST) == []


@BOTH
def test_refit_starts_unlabeled_and_old_labels_stay_queryable(store: Store) -> None:
    old = write_fit(store, [0])
    store.set_label(MODEL, DIGEST, 0, 0, "spurious")
    new = write_fit(store, [0], seed=1)
    assert store.list_labels(MODEL, DIGEST) == [] and store.spurious_components(MODEL, DIGEST) == {}
    assert [x.fit_id for x in store.list_labels(MODEL, DIGEST, fit_id=old)] == [old]
    store.set_label(MODEL, DIGEST, 0, 1, "not_spurious", fit_id=old)  # an old fit can still be labeled
    assert [x.fit_id for x in store.list_labels(MODEL, DIGEST, fit_id=old)] == [old, old]
    assert store.current_fit_id(MODEL, DIGEST) == new
    assert store.label_map(MODEL, DIGEST, old) == {(0, 0): "spurious", (0, 1): "not_spurious"}
    assert store.label_map(MODEL, DIGEST, new) == {}


def _writes(records: list[Label]) -> list[tuple[int, int, str, str, str]]:
    return [(x.class_index, x.component, x.label, x.note, x.author) for x in records]


@BOTH
def test_two_labellers_each_write_is_kept_with_its_author_in_order(store: Store) -> None:
    fit_id = write_fit(store, [0, 1])
    first = store.set_label(MODEL, DIGEST, 0, 1, "spurious", "watermark", author="alice")
    later = store.set_label(MODEL, DIGEST, 0, 1, "not_spurious", "it is the object", author="bob")
    store.set_label(MODEL, DIGEST, 1, 3, "inconsistent", "half of them")  # no tokens: no author
    cleared = store.set_label(MODEL, DIGEST, 0, 1, "unlabeled", author="alice")
    store.set_label(MODEL, DIGEST, 0, 2, "spurious", "text", author="bob")

    assert (first.author, later.author) == ("alice", "bob")
    assert _writes(store.list_labels(MODEL, DIGEST)) == [(0, 2, "spurious", "text", "bob"),
                                                         (1, 3, "inconsistent", "half of them", "")]
    history = store.label_history(MODEL, DIGEST, class_index=0, component=1)
    assert _writes(history) == [(0, 1, "spurious", "watermark", "alice"),
                                (0, 1, "not_spurious", "it is the object", "bob"),
                                (0, 1, "unlabeled", "", "alice")]  # the clearing write stays, with its time
    assert history[0] == first and history[-1] == cleared and cleared.updated is not None
    assert [x.fit_id for x in history] == [fit_id] * 3
    assert [(x.class_index, x.component) for x in store.label_history(MODEL, DIGEST, class_index=0)] == [
        (0, 1), (0, 1), (0, 1), (0, 2)]  # write order, not (class, component) order
    assert len(store.label_history(MODEL, DIGEST)) == 5
    assert store.label_history(MODEL, DIGEST, class_index=1, component=0) == []

    assert _writes(store.list_labels(MODEL, DIGEST, class_index=1, component=3)) == [
        (1, 3, "inconsistent", "half of them", "")]
    assert [(x.component, x.label) for x in store.list_labels(MODEL, DIGEST, class_index=0, component=1,
                                                              label="unlabeled")] == [(1, "unlabeled")]
    assert store.list_labels(MODEL, DIGEST, class_index=0, component=2, label="unlabeled") == []
    for call in (store.list_labels, store.label_history):
        with pytest.raises(InvalidInput, match="component filter needs class_index"):
            call(MODEL, DIGEST, component=1)
        with pytest.raises(NotFound, match="no component 4"):
            call(MODEL, DIGEST, class_index=0, component=NUM)
        with pytest.raises(NotFound, match="class 5 is not fitted"):
            call(MODEL, DIGEST, class_index=5)


@BOTH
def test_carried_labels_keep_their_author_and_history(store: Store) -> None:
    base = write_fit(store, [0, 1])
    store.set_label(MODEL, DIGEST, 0, 1, "not_spurious", "first look", author="alice")
    store.set_label(MODEL, DIGEST, 0, 1, "spurious", "watermark", author="bob")
    store.set_label(MODEL, DIGEST, 1, 2, "spurious", "stripes", author="carol")
    with store.extend_fit(MODEL, DIGEST) as writer:
        writer.add_class(components(1, images=10))  # refitted, same eigenvectors: carried by matching them
        meta = writer.commit()
    assert meta.fit_id != base
    assert [(x.class_index, x.component, x.author) for x in store.list_labels(MODEL, DIGEST)] == [
        (0, 1, "bob"), (1, 2, "carol")]
    assert _writes(store.label_history(MODEL, DIGEST, class_index=0)) == [  # an unchanged class: its history too
        (0, 1, "not_spurious", "first look", "alice"), (0, 1, "spurious", "watermark", "bob")]
    (carried,) = store.label_history(MODEL, DIGEST, class_index=1)
    assert (carried.author, carried.note) == ("carol", f"carried from fit {base} component 2 (|cos| 1.000); stripes")
    assert len(store.label_history(MODEL, DIGEST, fit_id=base)) == 3  # the old fit's history stays


OLD_SQLITE_LABELS = """CREATE TABLE labels (
    model TEXT NOT NULL, digest TEXT NOT NULL, fit_id TEXT NOT NULL, class_index INTEGER NOT NULL,
    component INTEGER NOT NULL, label TEXT NOT NULL, note TEXT NOT NULL, updated TEXT NOT NULL,
    PRIMARY KEY (model, digest, fit_id, class_index, component)
) WITHOUT ROWID"""
OLD_ROW = (MODEL, DIGEST, "f1", 0, 2, "spurious", "from before authors", "2025-05-05T05:05:05.000+00:00")


def _database_from_before_authors(root: Path, labels_url: str) -> None:
    """A labels database as a server without authors or history left it, with one label."""
    root.mkdir()
    if labels_url == "sqlite":
        with closing(sqlite3.connect(root / "labels.sqlite3", isolation_level=None)) as db:
            db.execute(OLD_SQLITE_LABELS)
            db.execute("INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?)", OLD_ROW)
        return
    with psycopg.connect(labels_url, autocommit=True) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in postgres_store.MIGRATIONS[0]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version (version) VALUES (1)")
        db.execute("INSERT INTO imports (source, store, labels, jobs) VALUES ('labels.sqlite3', %s, 0, 0)", (str(root),))
        db.execute("INSERT INTO labels VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", OLD_ROW)


@BOTH
def test_a_database_from_before_authors_is_migrated_on_open(tmp_path: Path, labels_url: str) -> None:
    _database_from_before_authors(tmp_path / "store", labels_url)
    old = Label(*OLD_ROW, author="")
    for _ in range(2):  # opening again migrates nothing again
        opened = Store(tmp_path / "store", labels_url)
        assert opened.labels.query(MODEL, DIGEST, "f1") == [old]
        assert opened.labels.history(MODEL, DIGEST, "f1") == [old]  # seeded with the label as it stood
        opened.close()
    opened = Store(tmp_path / "store", labels_url)
    new = opened.labels.set(MODEL, DIGEST, "f1", 0, 2, "inconsistent", "", author="dave")
    assert opened.labels.query(MODEL, DIGEST, "f1") == [new]
    assert opened.labels.history(MODEL, DIGEST, "f1") == [old, new]
    opened.close()


@BOTH
def test_concurrent_label_writes_from_threads(store: Store, labels_url: str) -> None:
    write_fit(store, list(range(8)))
    barrier = threading.Barrier(8)

    def work(thread: int) -> None:
        barrier.wait()
        for i in range(30):
            store.set_label(MODEL, DIGEST, thread, i % NUM, "spurious", f"t{thread} i{i}")  # own class
            store.set_label(MODEL, DIGEST, 0, i % NUM, "not_spurious", f"t{thread}")  # contended rows

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    labels = store.list_labels(MODEL, DIGEST)
    assert len(labels) == 8 * NUM
    assert {x.label for x in labels if x.class_index == 0} == {"not_spurious"}
    assert {(x.class_index, x.note) for x in labels if x.class_index > 0 and x.component == 1} == {
        (t, f"t{t} i29") for t in range(1, 8)
    }
    history = store.label_history(MODEL, DIGEST)
    assert len(history) == 8 * 30 * 2
    last = {(x.class_index, x.component): x for x in history}  # each component's newest write
    assert [last[(x.class_index, x.component)] for x in labels] == labels  # is its label, contended ones too
    if labels_url == "sqlite":
        with closing(sqlite3.connect(store.root / "labels.sqlite3")) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# ---- formats ----


@BOTH
def test_only_safetensors_json_and_sqlite_on_disk(store: Store, labels_url: str) -> None:
    write_fit(store, [0, 1])
    store.set_label(MODEL, DIGEST, 0, 0, "spurious")
    with store.extend_fit(MODEL, DIGEST) as writer:
        writer.add_class(components(2))
        writer.commit()
    pending = store.begin_fit(MODEL, DIGEST, dataset_root="/d", num_components=NUM, feature_dim=DIM)
    pending.add_class(components(0))
    pending.close()

    kinds = set()
    for path in (p for p in store.root.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            safetensors.numpy.load(path.read_bytes())
        elif path.suffix == ".json":
            json.loads(path.read_bytes())
        elif path.name == "labels.sqlite3":
            assert path.read_bytes()[:16] == b"SQLite format 3\x00"
        elif path.name in ("labels.sqlite3-wal", "labels.sqlite3-shm", ".lock"):
            pass
        else:
            pytest.fail(f"unexpected file in the store: {path}")
        kinds.add(path.suffix or path.name)
    assert {".safetensors", ".json", ".lock"} <= kinds
    assert (".sqlite3" in kinds) == (labels_url == "sqlite")  # PostgreSQL: nothing of it on the volume
    forbidden = re.compile(
        r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib)\b|allow_pickle\s*=\s*True|torch\.load|np\.load", re.M
    )
    sources = Path(store_pkg.__file__).parent.glob("*.py")
    assert not [p.name for p in sources if forbidden.search(p.read_text())]



def test_evaluations_are_kept_whole_and_listed_in_order(store: Store) -> None:
    first = store.save_evaluation(MODEL, DIGEST, {"mean_auc": 0.7, "evaluation_id": ""})
    time.sleep(0.01)  # ids order by time to the millisecond
    second = store.save_evaluation(MODEL, DIGEST, {"mean_auc": 0.8})
    kept = store.list_evaluations(MODEL, DIGEST)
    assert [(r["evaluation_id"], r["mean_auc"]) for r in kept] == [(first, 0.7), (second, 0.8)]  # the id wins
    assert store.list_evaluations(MODEL, "f" * 64) == []  # other weights: none
    folder = store.root / "models" / MODEL / DIGEST / "evaluations"
    assert sorted(p.name for p in folder.iterdir()) == [f"{first}.json", f"{second}.json"]  # no temp files
    with pytest.raises(ValueError):
        store.save_evaluation(MODEL, DIGEST, {"mean_auc": float("nan")})  # JSON has no NaN: callers clean it
    assert len(store.list_evaluations(MODEL, DIGEST)) == 2 and len(list(folder.iterdir())) == 2


# ---- job records and crash leftovers ----


def _job(job_id: str, state: vocab.JobStateName = "running", *, created: datetime | None = None) -> vocab.Job:
    request = vocab.FitRequest(MODEL, "train", (0, 2), 4, None, job_id, False)
    summary = vocab.FitSummary(job_id, job_id, MODEL, DIGEST, 9, 1, (vocab.FitClass(0, 5, 4),), 1.5)
    moment = created or datetime.now(timezone.utc)
    return vocab.Job(
        job_id, MODEL, state, request, vocab.FitProgress(job_id, "features", 4, 9, 0, 2, 0.25),
        summary if state == "succeeded" else None, None, moment, moment,
    )


DYING_OWNER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from test_store import _job
from spurguard.server.store import Store
from spurguard.server.store.labels import Label
jobs = Store(sys.argv[2], sys.argv[3]).jobs
jobs.claim_owner()
jobs.save(_job("orphan"))
os.kill(os.getpid(), signal.SIGKILL)
"""


@BOTH
def test_job_records_round_trip_and_outlive_their_server(store: Store, labels_url: str) -> None:
    jobs = store.jobs
    jobs.claim_owner()
    done = _job("done", "succeeded", created=datetime(2024, 1, 1, tzinfo=timezone.utc))
    jobs.save(done)
    assert jobs.get("done").job == done and jobs.get("nope") is None
    # A server killed while it ran a job: its lock is gone with it, so the job is interrupted.
    here = str(Path(__file__).parent)
    died = subprocess.run([sys.executable, "-c", DYING_OWNER, here, str(store.root), labels_url],
                          capture_output=True, timeout=60)
    assert died.returncode == -signal.SIGKILL, died.stderr
    replica = Store(store.root, labels_url)  # another live server sharing the store
    replica.jobs.claim_owner()
    replica.jobs.save(_job("elsewhere"))
    # PostgreSQL ends the killed server's session (and its lock) once it reads the closed socket.
    assert eventually(jobs.settle) == ["orphan"]
    orphan = jobs.get("orphan").job
    assert orphan.state == "failed" and orphan.error.code == "ABORTED"
    assert "interrupted" in orphan.error.message and "job id orphan to resume" in orphan.error.message
    assert orphan.progress == _job("orphan").progress  # what it had reached is kept
    assert jobs.get("elsewhere").job.state == "running"  # its server lives
    assert [r.job.job_id for r in jobs.list(MODEL)] == ["elsewhere", "orphan", "done"]  # newest first
    assert jobs.list("other") == []
    replica.jobs.release_owner()  # that server went away without finishing it
    assert jobs.get("elsewhere").job.error.code == "ABORTED"
    assert owner_traces(store, labels_url) == [jobs.owner]  # dead owners' removed
    replica.close()


def eventually(check: Callable[[], T], timeout: float = 5.0) -> T:
    """`check()`'s first truthy result, tried until `timeout`."""
    deadline = time.monotonic() + timeout
    while not (result := check()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return result


def owner_traces(store: Store, labels_url: str) -> list[str]:
    """The owners a store still keeps a trace of (lock files, or rows of the owners table)."""
    if labels_url == "sqlite":
        return sorted(p.name.removesuffix(".lock") for p in (store.root / "owners").iterdir())
    with psycopg.connect(labels_url) as db:
        return [row[0] for row in db.execute("SELECT owner FROM owners ORDER BY owner")]


def test_start_up_removes_crash_leftovers_and_old_unfinished_fits(store: Store) -> None:
    committed = write_fit(store, [0])
    (fit_dir(store, committed) / ".manifest.json.x1.tmp").write_bytes(b"{")
    (fit_dir(store, committed) / ".scratch").mkdir()
    (fit_dir(store, committed) / ".scratch" / "class-0.f32").write_bytes(b"\0" * 8)
    kwargs = dict(dataset_root="/d", num_components=NUM, feature_dim=DIM)
    for fit_id in ("old", "recent", "busy"):
        with store.begin_fit(MODEL, DIGEST, fit_id=fit_id, **kwargs) as writer:
            writer.add_class(components(0))
    week_ago = time.time() - 8 * 86400
    for fit_id in ("old", "busy"):
        for path in fit_dir(store, fit_id).iterdir():
            os.utime(path, (week_ago, week_ago))
    digest_dir = store.root / "models" / MODEL / DIGEST
    stale, fresh = digest_dir / ".current.json.a.tmp", digest_dir / ".current.json.b.tmp"
    stale.write_bytes(b"{")
    fresh.write_bytes(b"{")  # a replica may be writing it right now
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    with store.resume_fit(MODEL, DIGEST, "busy"):  # a live job holds it
        assert store.remove_leftovers(keep_unfinished_days=7) == [f"{MODEL}/old"]
    assert not fit_dir(store, "old").exists()
    assert store.pending_fits(MODEL, DIGEST) == ["busy", "recent"]
    assert sorted(p.name for p in fit_dir(store, committed).iterdir() if p.name.startswith(".")) == [".lock"]
    assert_same(store.load_fit(MODEL, DIGEST).components(0), components(0))
    assert not stale.exists() and fresh.exists()
    assert store.remove_leftovers(keep_unfinished_days=7) == [f"{MODEL}/busy"]  # free now, and old


# ---- PostgreSQL: migration, schema, changes pushed, sessions ----


def test_first_start_on_postgresql_imports_the_sqlite_labels_and_jobs_once(tmp_path: Path, postgres: PostgresServer) -> None:
    root = tmp_path / "store"
    embedded = Store(root)
    old = write_fit(embedded, [0, 1])
    embedded.set_label(MODEL, DIGEST, 0, 1, "spurious", "watermark")
    current = write_fit(embedded, [0, 1], seed=1)
    embedded.set_label(MODEL, DIGEST, 1, 0, "spurious", "the background", author="alice")
    embedded.set_label(MODEL, DIGEST, 1, 0, "inconsistent", "half of them", author="bob")
    embedded.set_label(MODEL, DIGEST, 1, 2, "not_spurious")
    embedded.jobs.claim_owner()
    done = _job("done", "succeeded", created=datetime(2024, 1, 1, tzinfo=timezone.utc))
    embedded.jobs.save(done)
    embedded.jobs.save(_job("cut-short"))  # its server is about to stop without finishing it
    before = {fit: embedded.list_labels(MODEL, DIGEST, fit_id=fit) for fit in (old, current)}
    history = {fit: embedded.label_history(MODEL, DIGEST, fit_id=fit) for fit in (old, current)}
    embedded.jobs.release_owner()
    embedded.close()

    url = postgres.new_database()
    shared = Store(root, url)
    assert {fit: shared.list_labels(MODEL, DIGEST, fit_id=fit) for fit in (old, current)} == before  # notes, times
    assert {fit: shared.label_history(MODEL, DIGEST, fit_id=fit) for fit in (old, current)} == history  # in order
    assert [x.author for x in history[current]] == ["alice", "bob", ""]
    assert shared.jobs.get("done").job == done
    assert shared.jobs.settle() == ["cut-short"]  # its server (on SQLite) is gone
    shared.set_label(MODEL, DIGEST, 1, 0, "unlabeled")
    shared.close()
    again = Store(root, url)  # a later start imports nothing again: the cleared label stays cleared
    assert [(x.class_index, x.component) for x in again.list_labels(MODEL, DIGEST)] == [(1, 2)]
    again.close()
    with psycopg.connect(url) as db:
        assert db.execute("SELECT source, labels, jobs FROM imports").fetchall() == [("labels.sqlite3", 3, 2)]


def test_postgresql_schema_is_made_once_by_concurrent_starts_and_a_newer_one_is_refused(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.new_database()
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda i: Store(tmp_path / "store", url), range(4)))
    for opened in stores:
        opened.close()
    newest = len(postgres_store.MIGRATIONS)
    with psycopg.connect(url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(v,) for v in range(1, newest + 1)]
        db.execute("INSERT INTO schema_version (version) VALUES (%s)", (newest + 1,))
    with pytest.raises(FailedPrecondition, match=f"schema version {newest + 1}, newer than this server's {newest}"):
        Store(tmp_path / "store", url)


def test_changes_reach_every_store_on_the_database_as_they_commit(tmp_path: Path, postgres: PostgresServer) -> None:
    assert Store(tmp_path / "embedded").changes is None  # SQLite pushes nothing: servers poll
    url = postgres.new_database()
    writer, reader = Store(tmp_path / "store", url), Store(tmp_path / "store", url)
    heard: queue.Queue[Change | None] = queue.Queue()
    reader.changes.subscribe(heard.put)
    assert reader.database.listening.wait(5)
    fit_id = write_fit(writer, [0])
    assert heard.get(timeout=1) == Change(MODEL, DIGEST, fit_id)  # the commit
    writer.set_label(MODEL, DIGEST, 0, 1, "spurious")
    assert heard.get(timeout=1) == Change(MODEL, DIGEST, fit_id)
    writer.set_label(MODEL, DIGEST, 0, 1, "unlabeled")
    assert heard.get(timeout=1) == Change(MODEL, DIGEST, fit_id)
    writer.close()
    reader.close()


def test_a_lost_session_reconnects_retakes_its_owner_lock_and_has_everything_checked(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    url = postgres.new_database()
    server, other = Store(tmp_path / "store", url), Store(tmp_path / "store", url)
    server.jobs.claim_owner()
    server.jobs.save(_job("running"))
    heard: queue.Queue[Change | None] = queue.Queue()
    server.changes.subscribe(heard.put)
    with psycopg.connect(url, autocommit=True) as db:  # the connection holding the owner lock, cut
        (cut,) = db.execute(
            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN owners o ON l.objid::bigint = o.lock_key "
            "WHERE l.locktype = 'advisory' AND o.owner = %s", (server.jobs.owner,)).fetchone()
    assert cut
    assert heard.get(timeout=10) is None  # back: whatever changed meanwhile, check everything
    assert other.jobs.get("running").job.state == "running"  # its owner is alive again
    write_fit(other, [0])
    assert isinstance(heard.get(timeout=1), Change)  # and it hears the others again
    server.close()
    assert eventually(lambda: other.jobs.get("running").job.state == "failed")  # closed: its lock is gone
    other.close()


def test_a_labels_url_other_than_sqlite_or_postgresql_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="--labels must be sqlite or a postgresql://") as refused:
        Store(tmp_path / "store", "mysql://spurguard:s3cret@db/labels")
    assert "s3cret" not in str(refused.value)  # a URL may hold a password: never echoed
    with pytest.raises(InvalidInput, match="got 'sqlite3'"):
        Store(tmp_path / "store", "sqlite3")
    with pytest.raises(InvalidInput, match="cannot parse") as refused:
        Store(tmp_path / "store", "postgresql://spurguard:s3cret@[db/labels")
    assert "s3cret" not in str(refused.value)


def test_a_transfer_job_record_round_trips_and_an_interrupted_one_says_transfer(store: Store) -> None:
    jobs = store.jobs
    jobs.claim_owner()
    moment = datetime(2024, 1, 2, tzinfo=timezone.utc)
    request = vocab.TransferRequest("robust", MODEL, (0, 3), 8, "move")
    summary = vocab.TransferSummary("move", "transfer-1", "robust", "fit-r", MODEL, DIGEST, "snap", (
        vocab.TransferClass(3, 12, (vocab.TransferDirection(1, 0.5, -0.25),)),), 12, 1, 2.0)
    done = vocab.Job("move", MODEL, "succeeded", None, vocab.FitProgress("move", "committing", 12, 12, 2, 2, 1.0), None,
                     None, moment, moment, "transfer", request, summary)
    jobs.save(done)
    assert jobs.get("move").job == done
    running = dataclasses.replace(done, job_id="moving", state="running", transfer_summary=None)
    jobs.save(running)
    jobs.release_owner()  # its server went away
    interrupted = Store(store.root).jobs.get("moving").job
    assert interrupted.error.code == "ABORTED" and "transfer again with job id moving" in interrupted.error.message
