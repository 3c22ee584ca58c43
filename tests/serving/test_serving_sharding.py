"""A fit sharded over N = 3 workers and merged equals the unsharded fit of the same demo data:
same components (to float rounding), alphas and image index; and a server on the merged store
serves it. The fits run through the console script's entry point (`spurguard fit --store`), in
process, as the pods of a Kubernetes Job run it."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spurguard.client import Client, cli
from spurguard.server.backends import TorchBackend, load_model
from spurguard.server.demo import generate
from spurguard.server.errors import FailedPrecondition
from spurguard.server.rpc.app import BackgroundServer, ServerConfig
from spurguard.server.serving.sharding import merge_shards, run_shard, shard_range
from spurguard.server.store import Store
from spurguard.server.store.layout import ModelPaths, recorded_classes
from spurguard.server.store.shards import shards_dir

pytestmark = pytest.mark.timeout(300)

COMPONENTS = 10
# Classes 0-3 at 200 images each plus one unreadable file: the shard boundaries (267 and 534 of
# 801) cut classes 1 and 2, one side of each above d = 128 rows (kept as a scatter), the other
# below (kept as rows), so the merge gets both kinds of partial statistics.
CLASSES = "0,1,2,3"
PER_CLASS = 200
JOB = "nightly"


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    model = load_model("demo", device="cpu")
    assert isinstance(model, TorchBackend)
    return model


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "data"
    generate(root, 0, train_per_class=PER_CLASS, test_per_class=1, spurious_per_feature=1)
    (root / "train" / "circle" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    return root / "train"


def fit_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`spurguard --json fit …` in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.delenv("JOB_COMPLETION_INDEX", raising=False)
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        try:
            code = cli.main(["--json", "fit", *argv])
        except SystemExit as stop:
            code = int(stop.code or 0)
    return code, out.getvalue(), err.getvalue()


def fit_ok(*argv: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    code, out, err = fit_cli(*argv, env=env)
    assert code == cli.EXIT_OK, err[-3000:]
    return json.loads(out)


def common(data: Path) -> list[str]:
    return ["--model", "demo", "--data", str(data), "--classes", CLASSES, "--components", str(COMPONENTS),
            "--runtime", "torch", "--job-id", JOB]


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, Any]:
    """The unsharded fit, and the merge of three shards (shard 2 takes its index from
    $JOB_COMPLETION_INDEX, as a pod of an Indexed Job does), each in its own store."""
    stores = tmp_path_factory.mktemp("stores")
    whole, sharded = stores / "whole", stores / "sharded"
    outputs: dict[str, Any] = {"whole": fit_ok("--store", str(whole), *common(data))}
    outputs["shards"] = [fit_ok(f"--store={sharded}", *common(data), "--shard", f"{i}/3") for i in (0, 1)]
    outputs["shards"].append(fit_ok("--store", str(sharded), *common(data), "--shard", "auto/3",
                                    env={"JOB_COMPLETION_INDEX": "2"}))
    outputs["merged"] = fit_ok("--store", str(sharded), "--model", "demo", "--job-id", JOB, "--merge", "3")
    return {"whole_store": whole, "sharded_store": sharded, **outputs}


def projector(vectors: np.ndarray) -> np.ndarray:
    return vectors.T @ vectors


def test_the_merged_fit_equals_the_unsharded_fit(fits: dict[str, Any], backend: TorchBackend) -> None:
    whole = Store(fits["whole_store"]).load_fit(backend.name, backend.digest)
    merged = Store(fits["sharded_store"]).load_fit(backend.name, backend.digest)  # the current fit
    assert merged.fit_id == whole.fit_id == JOB
    assert merged.classes == whole.classes == (0, 1, 2, 3)
    assert (merged.meta.dataset_root, merged.meta.num_components, merged.meta.feature_dim) == (
        whole.meta.dataset_root, whole.meta.num_components, whole.meta.feature_dim)
    # Images meet different batch-mates in the shards, which moves their float32 features by
    # rounding: within that, the fits are the same.
    for k in whole.classes:
        a, b = whole.components(k), merged.components(k)
        assert b.image_ids == a.image_ids  # the same image index, in the same order
        assert (b.count, b.num_components) == (a.count, a.num_components) == (PER_CLASS, COMPONENTS)
        np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-6)
        np.testing.assert_allclose(projector(b.vectors), projector(a.vectors), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.abs(b.vectors), np.abs(a.vectors), rtol=0, atol=1e-6)
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b.alphas, a.alphas, rtol=1e-5, atol=1e-5 * float(np.abs(a.alphas).max()))
        np.testing.assert_allclose(b.total_variance, a.total_variance, rtol=1e-6)
    # The printed summaries agree too: the unreadable image is skipped once, in both.
    for key in ("images", "skipped_images", "classes", "fit_id", "model", "digest"):
        assert fits["merged"][key] == fits["whole"][key], key
    assert fits["whole"]["skipped_images"] == 1


def test_the_shards_split_the_listing_and_kept_both_kinds_of_statistics(fits: dict[str, Any], backend: TorchBackend) -> None:
    shards = fits["shards"]
    assert [s["shard"] for s in shards] == [0, 1, 2]
    assert [s["images"] for s in shards] == [stop - start for start, stop in (shard_range(801, i, 3) for i in range(3))]
    assert [[c["class"] for c in s["classes"]] for s in shards] == [[0, 1], [1, 2], [2, 3]]
    # Parts above d = 128 rows were kept as scatters, the others as rows: both were merged above.
    sizes = sorted(c["images"] for s in shards for c in s["classes"])
    assert sizes[0] < backend.feature_dim < sizes[-1]
    # After the merge the shard outputs are gone; the fit is a normal one.
    assert not shards_dir(ModelPaths.of(fits["sharded_store"], backend.name, backend.digest), JOB).exists()


def test_a_server_on_the_merged_store_serves_the_merged_fit(fits: dict[str, Any], data: Path) -> None:
    config = ServerConfig(models=("demo",), store=fits["sharded_store"], port=0, runtime="torch", store_poll_s=0)
    with BackgroundServer(config) as server, Client(server.address) as client:
        model = client.get_model("demo")
        assert (model.fit_id, model.fitted_classes) == (JOB, (0, 1, 2, 3))
        image = data / "star" / "0000.png"  # class 3
        [result] = client.score("demo", [image.read_bytes()], class_index=3)
        assert result.error is None and result.class_index == 3 and result.components
        whole = Store(fits["whole_store"])
        [expected] = _score_locally(whole, image)
        assert result.logit == pytest.approx(expected.logit, rel=1e-5)
        assert result.residual == pytest.approx(expected.residual, rel=1e-4, abs=1e-4)


def _score_locally(store: Store, image: Path) -> list[Any]:
    """The same image scored in process against the unsharded fit (README's library use)."""
    from spurguard.server.serving.guard import Guard

    backend = load_model("demo", device="cpu")
    guard = Guard.load(backend, store)
    pixels = backend.preprocess([image.read_bytes()])
    return guard.score_features(backend.features(pixels), [image.name], class_index=3)


# ---- what goes wrong ----


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small") / "data"
    generate(root, 1, train_per_class=4, test_per_class=1, spurious_per_feature=1)
    return root / "train"


def test_a_missing_shard_is_named_and_a_merge_can_wait_for_it(tmp_path: Path, small: Path, backend: TorchBackend) -> None:
    store = tmp_path / "store"
    run_shard(backend, store, small, fit_id="j", shard=1, num_shards=3, num_components=3)
    code, out, err = fit_cli("--store", str(store), "--model", "demo", "--job-id", "j", "--merge", "3")
    assert code == cli.EXIT_ERROR
    error = json.loads(out)["error"]
    assert error["code"] == "FAILED_PRECONDITION"
    assert "shard(s) 0-of-3, 2-of-3 not written yet (JOB_COMPLETION_INDEX 0, 2)" in error["message"]
    assert "0-of-3, 2-of-3" in err
    started = time.monotonic()
    code, out, _ = fit_cli("--store", str(store), "--model", "demo", "--job-id", "j", "--merge", "3", "--wait", "0.5")
    assert code == cli.EXIT_ERROR and time.monotonic() - started >= 0.5 and "0-of-3, 2-of-3" in out
    for shard in (0, 2):
        run_shard(backend, store, small, fit_id="j", shard=shard, num_shards=3, num_components=3)
    done = fit_ok("--store", str(store), "--model", "demo", "--job-id", "j", "--merge", "3", "--wait", "5")
    assert done["images"] == 24 and len(done["classes"]) == 6


def test_shards_of_other_settings_or_data_do_not_merge(tmp_path: Path, small: Path, backend: TorchBackend) -> None:
    store = Store(tmp_path / "store")
    for shard in (0, 1):
        run_shard(backend, store.root, small, fit_id="j", shard=shard, num_shards=2, num_components=3)
    run_shard(backend, store.root, small, fit_id="k", shard=0, num_shards=2, num_components=3)
    run_shard(backend, store.root, small, fit_id="k", shard=1, num_shards=2, num_components=4)
    with pytest.raises(FailedPrecondition, match="shard 1-of-2 was run with other settings than shard 0-of-2 "
                                                 r"\(num_components 4 vs 3\)"):
        merge_shards(backend, store, fit_id="k", num_shards=2)
    other = tmp_path / "other"
    (other / "circle").mkdir(parents=True)
    for image in sorted((small / "circle").iterdir())[:3]:
        (other / "circle" / image.name).write_bytes(image.read_bytes())
    run_shard(backend, store.root, other, fit_id="k", shard=1, num_shards=2, num_components=3)
    with pytest.raises(FailedPrecondition, match="other settings.*dataset_root.*listing_sha256"):
        merge_shards(backend, store, fit_id="k", num_shards=2)
    with pytest.raises(FailedPrecondition, match="the shards were run with components 3, not 5"):
        merge_shards(backend, store, fit_id="j", num_shards=2, num_components=5)
    assert merge_shards(backend, store, fit_id="j", num_shards=2).meta.fit_id == "j"
    with pytest.raises(FailedPrecondition, match="already committed; shard a new job id"):
        run_shard(backend, store.root, small, fit_id="j", shard=0, num_shards=2)


def test_a_rerun_shard_replaces_its_own_output(tmp_path: Path, small: Path, backend: TorchBackend) -> None:
    root = shards_dir(ModelPaths.of(tmp_path, backend.name, backend.digest), "j")
    run_shard(backend, tmp_path, small, fit_id="j", shard=0, num_shards=2, num_components=3)
    first = json.loads((root / "0-of-2.json").read_text())["run"]
    run_shard(backend, tmp_path, small, fit_id="j", shard=0, num_shards=2, num_components=3)
    second = json.loads((root / "0-of-2.json").read_text())["run"]
    assert first != second
    assert {p.name for p in root.iterdir()} == {"0-of-2.json", "0-of-2.lock", second}


def test_a_merge_killed_midway_resumes_after_the_classes_it_wrote(tmp_path: Path, small: Path,
                                                                  backend: TorchBackend) -> None:
    store = tmp_path / "store"
    for shard in (0, 1):
        run_shard(backend, store, small, fit_id="j", shard=shard, num_shards=2, num_components=3)
    merge = [sys.executable, "-m", "spurguard", "fit", "--store", str(store), "--model", "demo", "--job-id", "j",
             "--merge", "2"]
    killed = subprocess.run(merge, env={**os.environ, "SPURGUARD_CRASH_AT": "class:j:2"}, capture_output=True,
                            text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    paths = ModelPaths.of(store, backend.name, backend.digest)
    assert recorded_classes(paths.fit("j")) == [0, 1, 2] and Store(store).current_fit_id(backend.name, backend.digest) is None
    done = fit_ok("--store", str(store), "--model", "demo", "--job-id", "j", "--merge", "2")
    assert [c["class"] for c in done["classes"]] == list(range(6))
    assert done["images"] == 24 - 12  # classes 0-2 came from the killed run
    assert Store(store).current_fit_id(backend.name, backend.digest) == "j"
