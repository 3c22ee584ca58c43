"""Transfer (SPEC §1 transfer, §3) through a real server serving three models: `tiny` (the source,
fitted and labelled), `tiny2` (another TinyCNN with other preprocessing, never fitted) and
`gated` (an in-process backend whose forward waits on a gate: a transfer held mid-run).

The numbers the server sends are checked against a float64 reference of SPEC §1 computed here
from the source fit's stored alphas and the target's own features of the same files.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from spurguard.client import Client, FitProgress, SpurguardClientError
from spurguard.server.backends import load_model
from spurguard.server.rpc.app import BackgroundServer, ServerConfig
from spurguard.server.serving.transferring import plan_transfer, run_transfer
from spurguard.server.store import Store
from spurguard.vocab import TransferSummary

from rpc_support import write_data_root

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from backends_support import CLASSES, SIZE, write_tiny_model_dir  # noqa: E402

PER_CLASS = 10
CODE = grpc.StatusCode
SPURIOUS = {0: [0, 1], 1: [2]}  # class 0 has two directions: least squares
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer")
    other = {"size": SIZE, "resize": SIZE, "interpolation": "bilinear", "mean": [0.4] * 3, "std": [0.3] * 3}
    return {
        "tiny": write_tiny_model_dir(root / "tiny"),
        "tiny2": write_tiny_model_dir(root / "tiny2", seed=5, name="tiny2", preprocess=other),
        "data": write_data_root(root / "data", CLASSES, PER_CLASS, spurious=6),
        "store": root / "store",
    }


@pytest.fixture(scope="module")
def gated() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_rpc_server import _gated_backend  # the gated TinyCNN of the server tests

    return _gated_backend()


@pytest.fixture(scope="module")
def client(dirs: dict[str, Path], gated: Any) -> Iterator[Client]:
    config = ServerConfig(models=(str(dirs["tiny"]), str(dirs["tiny2"])), store=dirs["store"], port=0,
                          data_roots=(dirs["data"],), device="cpu", max_delay_ms=2.0, grace_s=2.0, runtime="torch")
    with BackgroundServer(config, backends=[gated[0]]) as running, Client(running.address, timeout=30) as c:
        *_, fitted = c.fit("tiny", str(dirs["data"] / "train"), classes=[0, 1], num_components=4)
        for k, components in SPURIOUS.items():
            for l in components:
                c.label("tiny", k, l, "spurious")
        yield c


@pytest.fixture(scope="module")
def transferred(client: Client) -> tuple[list[Any], TransferSummary]:
    updates = list(client.transfer("tiny", "tiny2"))
    assert isinstance(updates[-1], TransferSummary)
    return updates[:-1], updates[-1]


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SpurguardClientError) as caught:
        call()
    return caught.value.code, caught.value.details


def _reference(dirs: dict[str, Path], k: int, queries: list[bytes]) -> dict[str, np.ndarray]:
    """SPEC §1 in float64 from the stored source fit and the target's features of the same files."""
    source, target = load_model(str(dirs["tiny"]), "cpu"), load_model(str(dirs["tiny2"]), "cpu")
    fit = Store(dirs["store"]).load_fit("tiny", source.digest)
    components = fit.components(k)
    root = Path(fit.meta.dataset_root)
    phi = target.features(target.preprocess([(root / i).read_bytes() for i in components.image_ids])).double().numpy()
    w = target.head()[0][k].double().numpy()
    a = phi * w
    m = a.mean(axis=0)
    alphas = components.alphas[:, SPURIOUS[k]].astype(np.float64)
    d = np.stack([(alphas[:, j, None] * (a - m)).sum(axis=0) for j in range(alphas.shape[1])])
    d /= np.linalg.norm(d, axis=1, keepdims=True)

    def contributions(features: np.ndarray) -> np.ndarray:
        coefficients = np.linalg.lstsq(d.T, (features * w - m).T, rcond=None)[0]
        return coefficients.T * d.sum(axis=1)

    query = target.features(target.preprocess(queries)).double().numpy()
    return {"fit": fit.fit_id, "query": contributions(query), "floor": np.percentile(contributions(phi), 5, axis=0),
            "covariance": np.linalg.norm((alphas.T @ (a - m)), axis=1) / (len(a) - 1)}


def test_transfer_streams_progress_then_the_summary(client: Client, transferred, dirs) -> None:  # noqa: ANN001
    progress, summary = transferred
    assert progress and all(isinstance(p, FitProgress) for p in progress)
    assert progress[-1].images_total == 2 * PER_CLASS and {p.job_id for p in progress} == {summary.job_id}
    assert (summary.source_model, summary.target_model, summary.images) == ("tiny", "tiny2", 2 * PER_CLASS)
    assert summary.source_fit == client.get_model("tiny").fit_id
    assert [(c.class_index, c.images, [d.source_component for d in c.directions]) for c in summary.classes] == [
        (0, PER_CLASS, [0, 1]), (1, PER_CLASS, [2])]
    reference = _reference(dirs, 0, [])
    np.testing.assert_allclose([d.covariance for d in summary.classes[0].directions], reference["covariance"], rtol=1e-4)
    np.testing.assert_allclose([d.alpha_floor for d in summary.classes[0].directions], reference["floor"],
                               rtol=1e-4, atol=1e-6)
    job = client.get_job(summary.job_id)
    assert (job.kind, job.model, job.state, job.request) == ("transfer", "tiny2", "succeeded", None)
    assert job.transfer.source_model == "tiny" and job.transfer_summary == summary


def test_score_of_the_target_applies_and_names_the_transferred_directions(client: Client, transferred, dirs) -> None:  # noqa: ANN001
    _, summary = transferred
    files = sorted((dirs["data"] / "train" / "0").iterdir())[:3] + sorted((dirs["data"] / "train" / "2").iterdir())[:2]
    images = [(f.name, f.read_bytes()) for f in files]
    reference = _reference(dirs, 0, [data for _, data in images])
    results = client.score("tiny2", images, class_index=0, top=0)
    for i, result in enumerate(results):
        assert result.transfer_id == summary.transfer_id and result.fit_id == "" and result.bias_term is None
        moved = {c.source: c for c in result.components}
        assert set(moved) == {f"tiny/{reference['fit']}/0/0", f"tiny/{reference['fit']}/0/1"}
        assert [c.index for c in result.components if c.source.endswith("/0/0")] == [0]
        got = [moved[f"tiny/{reference['fit']}/0/{l}"].alpha for l in (0, 1)]
        np.testing.assert_allclose(got, reference["query"][i], rtol=1e-4, atol=1e-5)
        evidence = np.clip(reference["query"][i] - reference["floor"], 0, None).sum()
        assert result.spurious_alpha == pytest.approx(evidence, rel=1e-4, abs=1e-5)
        assert result.spufix.logit == pytest.approx(result.logit - evidence, rel=1e-4, abs=1e-5)  # SpuFix uses them
        assert result.to_dict()["components"][0]["source"].startswith("tiny/")
    with contextlib.closing(triton.InferenceServerClient(client.target)) as oip:  # the OIP outputs apply them too
        tensor = triton.InferInput("IMAGE", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array([data for _, data in images], dtype=np.object_))
        arrays = oip.infer("tiny2", [tensor], parameters={"class_index": 0})
    np.testing.assert_allclose(arrays.as_numpy("SPURIOUS_ALPHA"), [r.spurious_alpha for r in results], rtol=1e-5)
    np.testing.assert_allclose(arrays.as_numpy("SPUFIX_LOGITS")[:, 0], [r.spufix.logit for r in results], rtol=1e-5)


def test_get_model_says_which_transfer_and_relabelling_the_source_waits_for_the_next(client: Client, transferred, dirs) -> None:  # noqa: ANN001
    _, summary = transferred
    info = client.get_model("tiny2").transfer
    assert (info.transfer_id, info.source_model, info.source_fit, info.classes) == (
        summary.transfer_id, "tiny", summary.source_fit, (0, 1))
    assert [(r.class_index, r.component, r.label) for r in info.labels] == [(0, 0, "spurious"), (0, 1, "spurious"),
                                                                          (1, 2, "spurious")]
    image = [("a", (dirs["data"] / "train" / "1" / "img00.png").read_bytes())]
    before = client.score("tiny2", image, class_index=1)[0]
    client.label("tiny", 1, 2, "unlabeled")
    try:
        assert client.get_model("tiny2").transfer == info and client.score("tiny2", image, class_index=1)[0] == before
        *_, fewer = client.transfer("tiny", "tiny2")
        assert fewer.transfer_id != summary.transfer_id and [c.class_index for c in fewer.classes] == [0]
        assert client.score("tiny2", image, class_index=1)[0].spurious_alpha == 0.0
    finally:
        client.label("tiny", 1, 2, "spurious")
    *_, again = client.transfer("tiny", "tiny2")  # the same source state: the stored transfer, in use again
    assert again.transfer_id == summary.transfer_id and again.images == 0
    assert client.get_model("tiny2").transfer.transfer_id == summary.transfer_id


def test_evaluate_applies_the_chosen_directions_and_lists_them(client: Client, transferred, dirs) -> None:  # noqa: ANN001
    _, summary = transferred

    def evaluate(model: str, **options: Any) -> Any:
        return list(client.evaluate(model, str(dirs["data"] / "train"), str(dirs["data"] / "spurious"), **options))[-1]

    both = evaluate("tiny2")
    assert (both.directions, both.transfer_id) == ("both", summary.transfer_id)
    assert [(d.class_index, d.component, d.source.split("/")[0]) for d in both.spurious_directions] == [
        (0, 0, "tiny"), (0, 1, "tiny"), (1, 2, "tiny")]
    assert evaluate("tiny2", directions="transferred").spufix == both.spufix  # tiny2 has no own labels
    own = evaluate("tiny2", directions="own")
    assert (own.transfer_id, own.spurious_directions, own.spufix) == ("", (), own.baseline)
    on_source = evaluate("tiny", directions="own")
    assert [(d.class_index, d.component, d.source) for d in on_source.spurious_directions] == [
        (0, 0, ""), (0, 1, ""), (1, 2, "")]
    code, message = _code(lambda: evaluate("tiny", directions="transferred"))
    assert code == CODE.FAILED_PRECONDITION and "applies no transfer" in message


def test_bad_transfers_fail_with_their_status(client: Client, transferred, dirs) -> None:  # noqa: ANN001
    def transfer(source: str, target: str, **options: Any) -> Any:
        return _code(lambda: list(client.transfer(source, target, **options)))

    assert transfer("nope", "tiny2")[0] == CODE.NOT_FOUND
    assert transfer("tiny", "nope")[0] == CODE.NOT_FOUND
    assert transfer("tiny", "tiny2", classes=[7])[0] == CODE.NOT_FOUND
    code, message = transfer("tiny", "tiny2", classes=[2])
    assert code == CODE.FAILED_PRECONDITION and "no component labelled spurious" in message
    code, message = transfer("tiny2", "tiny")  # a source never fitted
    assert code == CODE.FAILED_PRECONDITION and "no fit" in message
    assert transfer("tiny", "tiny")[0] == CODE.INVALID_ARGUMENT
    *_, fitted = client.fit("tiny2", str(dirs["data"] / "train"), classes=[0], num_components=2)
    code, message = transfer("tiny2", "tiny")  # fitted, but nothing labelled spurious
    assert code == CODE.FAILED_PRECONDITION and "nothing to transfer" in message


def test_a_transfer_job_can_be_cancelled_and_runs_again(client: Client, transferred, gated) -> None:  # noqa: ANN001
    gate = gated[1].gate
    gate.clear()
    try:
        stream = client.transfer("tiny", "gated", batch_size=2, job_id="move-1")
        assert isinstance(next(stream), FitProgress)
        assert client.cancel_job("move-1").state in ("running", "cancelled")
    finally:
        gate.set()
    code, message = _code(lambda: list(stream))
    assert code == CODE.CANCELLED and "transfer again" in message
    assert client.get_job("move-1").kind == "transfer" and client.get_job("move-1").state == "cancelled"
    assert "move-1" in [j.job_id for j in client.list_jobs("gated")]
    *_, summary = client.transfer("tiny", "gated", batch_size=2, job_id="move-1")  # the same id runs again
    assert isinstance(summary, TransferSummary) and client.get_model("gated").transfer.transfer_id == summary.transfer_id
    assert list(client.watch_job("move-1"))[-1] == summary  # WatchJob of a transfer ends with its summary


def test_a_cancelled_transfer_resumes_after_its_finished_classes(dirs, tmp_path: Path) -> None:  # noqa: ANN001
    """In process: cancelled once class 0 is stored, the next run reads only class 1's images."""
    source, target = load_model(str(dirs["tiny"]), "cpu"), load_model(str(dirs["tiny2"]), "cpu")
    store = Store(dirs["store"])
    copy = Store(tmp_path / "store")  # a target store of its own, so the module's transfers stay as they are
    plan = plan_transfer(source, target, store, [])
    cancel = threading.Event()

    def stop_after_one_class(progress: FitProgress) -> None:
        if progress.classes_done >= 1:
            cancel.set()

    fit = store.load_fit("tiny", source.digest)
    # the copy needs the source fit to read alphas from: the same files, another root
    copy.root.joinpath("models").mkdir(parents=True, exist_ok=True)
    (copy.root / "models" / "tiny").symlink_to(store.root / "models" / "tiny")
    with pytest.raises(Exception, match="cancelled after 1 of 2 classes"):
        run_transfer(target, copy, plan, batch_size=3, progress=stop_after_one_class, cancel=cancel)
    outcome = run_transfer(target, copy, plan, batch_size=3)
    assert outcome.images == len(fit.components(1).image_ids) == PER_CLASS
    assert copy.current_transfer_id("tiny2", target.digest) == plan.transfer_id
    full = store.load_transfer("tiny2", target.digest, plan.transfer_id)
    for k, moved in outcome.stored.classes.items():
        np.testing.assert_allclose(moved.directions, full.classes[k].directions, rtol=1e-5, atol=1e-7)  # other batches
