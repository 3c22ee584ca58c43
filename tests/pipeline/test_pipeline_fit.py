"""Fit, Guard and evaluation over real image files, against a float64 reference built here.

The reference reads every image through the same backend, stores all weighted activations and
uses np.cov + np.linalg.eigh: what the streaming, spilling, threaded pipeline must reproduce.
"""
from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from spurguard.server.backends import PreprocessConfig, TorchBackend
from spurguard.server.engine import roc_auc, softmax
from spurguard.server.errors import Cancelled, FailedPrecondition, InvalidInput, PermissionDenied
from spurguard.server.loader import iter_batches
from spurguard.server.serving.evaluation import run_evaluate
from spurguard.server.serving.fitting import FitProgress, run_fit
from spurguard.server.serving.guard import Guard
from spurguard.server.serving.paths import DataRoots
from spurguard.server.store import Store

SIZE, DIM, CLASSES, PER_CLASS, COMPONENTS = 12, 10, 3, 14, 4


def _backend() -> TorchBackend:
    torch.manual_seed(3)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, DIM, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()
    generator = torch.Generator().manual_seed(4)
    return TorchBackend(
        name="tiny",
        digest="0" * 64,
        backbone=body,
        weight=torch.randn(CLASSES, DIM, generator=generator),
        bias=torch.randn(CLASSES, generator=generator),
        preprocess_config=PreprocessConfig(SIZE, SIZE, "bilinear", (0.5,) * 3, (0.25,) * 3),
        class_names=["ant", "bee", "cat"],
        device="cpu",
        max_batch_size=5,  # batches straddle classes
    )


@pytest.fixture(scope="module")
def backend() -> TorchBackend:
    return _backend()


def _write_images(root: Path, folders: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for folder, count in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            pixels[: SIZE // 2] //= int(rng.integers(1, 4))  # per-image structure beyond noise
            Image.fromarray(pixels).save(root / folder / f"img{i:03d}.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "train"
    _write_images(root, {"ant": PER_CLASS, "1": PER_CLASS, "cat": PER_CLASS}, seed=0)
    (root / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def _reference(backend: TorchBackend, root: Path, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(eigenvalues, eigenvectors [L, d], alphas [n, L]) of class k by storing everything, float64."""
    folder = {0: "ant", 1: "1", 2: "cat"}[k]
    paths = sorted(p for p in (root / folder).iterdir() if p.name != "broken.png")
    x = backend.preprocess([p.read_bytes() for p in paths])
    phi = backend.features(x).double().numpy()
    w = backend.head()[0][k].double().numpy()
    a = phi * w
    values, vectors = np.linalg.eigh(np.cov(a, rowvar=False))
    values, vectors = values[::-1][:COMPONENTS], vectors[:, ::-1][:, :COMPONENTS].T
    alphas = ((a - a.mean(0)) @ vectors.T) * vectors.sum(1)
    return values, vectors, alphas, [f"{folder}/{p.name}" for p in paths]


@pytest.fixture(scope="module")
def fitted(backend: TorchBackend, dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    store = Store(tmp_path_factory.mktemp("store"))
    updates: list[FitProgress] = []
    outcome = run_fit(backend, store, dataset, num_components=COMPONENTS, progress=updates.append)
    return store, outcome, updates


def test_fit_equals_float64_reference(backend: TorchBackend, dataset: Path, fitted) -> None:
    store, outcome, _ = fitted
    fit = store.load_fit("tiny", backend.digest, outcome.meta.fit_id)
    assert fit.classes == (0, 1, 2)
    for k in range(CLASSES):
        values, vectors, alphas, ids = _reference(backend, dataset, k)
        comp = fit.components(k)
        assert comp.image_ids == ids
        np.testing.assert_allclose(comp.eigenvalues, values, rtol=1e-4)
        # subspaces equal: projector difference, sign-free
        np.testing.assert_allclose(comp.vectors.T @ comp.vectors, vectors.T @ vectors, atol=1e-4)
        scale = np.abs(alphas).max()
        np.testing.assert_allclose(comp.alphas, alphas, atol=1e-4 * scale)


def test_fit_reports_progress_and_skips_unreadable(fitted) -> None:
    _, outcome, updates = fitted
    assert [s[0] for s in outcome.skipped] == ["1/broken.png"]
    assert "broken" in outcome.skipped[0][0]
    assert [(c.class_index, c.images, c.num_components) for c in outcome.classes] == [
        (k, PER_CLASS, COMPONENTS) for k in range(CLASSES)
    ]
    assert updates[0].phase == "scanning" and updates[-1].phase == "committing"
    counts = [u.images_done for u in updates if u.phase == "features"]
    assert counts == sorted(counts) and counts[-1] == 3 * PER_CLASS + 1
    assert updates[-1].classes_done == CLASSES


def test_cancelled_fit_resumes_to_the_same_result(backend: TorchBackend, dataset: Path, fitted, tmp_path: Path) -> None:
    store_ref, outcome_ref, _ = fitted
    store = Store(tmp_path / "store")
    cancel = threading.Event()

    def stop_after_first_class(update: FitProgress) -> None:
        if update.images_done >= PER_CLASS + 5:  # class 0 is through; later batches remain
            cancel.set()

    with pytest.raises(Cancelled, match="resume"):
        run_fit(backend, store, dataset, num_components=COMPONENTS, fit_id="job-1",
                progress=stop_after_first_class, cancel=cancel)
    assert store.current_fit_id("tiny", backend.digest) is None
    assert store.pending_fits("tiny", backend.digest) == ["job-1"]
    resumed = run_fit(backend, store, dataset, num_components=COMPONENTS, fit_id="job-1")
    assert resumed.images < 3 * PER_CLASS + 1  # the finished class was not recomputed
    ref = store_ref.load_fit("tiny", backend.digest, outcome_ref.meta.fit_id)
    got = store.load_fit("tiny", backend.digest, "job-1")
    for k in range(CLASSES):
        np.testing.assert_allclose(got.components(k).alphas, ref.components(k).alphas, rtol=1e-5, atol=1e-6)


def test_a_fit_cut_short_in_its_commit_resumes_by_finishing_it(backend: TorchBackend, dataset: Path, tmp_path: Path) -> None:
    """Killed after its last class but before the manifest (reproduced as issue 11 did: delete
    the manifest), or after the manifest but before current.json: the same fit id finishes it."""
    store = Store(tmp_path / "store")
    first = run_fit(backend, store, dataset, num_components=COMPONENTS, fit_id="first")
    (store.root / "models" / "tiny" / backend.digest / "fits" / "first" / "manifest.json").unlink()
    assert store.pending_fits("tiny", backend.digest) == ["first"]
    resumed = run_fit(backend, store, dataset, num_components=COMPONENTS, fit_id="first")
    assert resumed.images == 0 and resumed.meta.classes == first.meta.classes == (0, 1, 2)
    assert store.load_fit("tiny", backend.digest).fit_id == "first"

    run_fit(backend, store, dataset, classes=[0, 2], num_components=COMPONENTS, fit_id="second")
    store.set_current("tiny", backend.digest, "first")  # as if the switch to "second" never happened
    finished = run_fit(backend, store, dataset, classes=[0, 2], num_components=COMPONENTS, fit_id="second")
    assert finished.images == 0 and [c.class_index for c in finished.classes] == [0, 2]
    assert store.current_fit_id("tiny", backend.digest) == "second"
    with pytest.raises(FailedPrecondition, match="already committed"):
        run_fit(backend, store, dataset, num_components=COMPONENTS - 1, fit_id="second")


def test_extend_adds_classes_and_keeps_labels(backend: TorchBackend, dataset: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run_fit(backend, store, dataset, classes=[0], num_components=COMPONENTS)
    store.set_label("tiny", backend.digest, 0, 1, "spurious", "stripes")
    with pytest.raises(FailedPrecondition, match="same number"):
        run_fit(backend, store, dataset, classes=[2], num_components=2, extend=True)
    outcome = run_fit(backend, store, dataset, classes=[2], num_components=COMPONENTS, extend=True)
    assert [c.class_index for c in outcome.classes] == [0, 2]
    assert store.spurious_components("tiny", backend.digest) == {0: [1]}


def test_fit_input_errors(backend: TorchBackend, dataset: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(InvalidInput, match="no images for class"):
        run_fit(backend, store, dataset, classes=[0, 7])
    with pytest.raises(InvalidInput, match="num_components"):
        run_fit(backend, store, dataset, num_components=0)
    with pytest.raises(FailedPrecondition, match="no fit to extend"):
        run_fit(backend, store, dataset, classes=[0], extend=True)


def test_a_file_turned_into_a_link_out_of_the_roots_mid_fit_stops_it(
    backend: TorchBackend, dataset: Path, tmp_path: Path
) -> None:
    """Unlike an unreadable file (skipped), a link out of the data roots read during the fit is
    refused and ends the fit: the dataset is being changed under the server."""
    copy = tmp_path / "data" / "train"
    shutil.copytree(dataset, copy)
    (tmp_path / "secret.png").write_bytes((dataset / "cat" / "img000.png").read_bytes())
    swapped = copy / "cat" / "img003.png"

    class SwapAfterListing(DataRoots):
        def check_listing(self, paths: Iterable[Path]) -> None:
            super().check_listing(paths)
            swapped.unlink()
            os.symlink(tmp_path / "secret.png", swapped)

    store = Store(tmp_path / "store")
    with pytest.raises(PermissionDenied, match=f"{swapped}.* leads outside"):
        run_fit(backend, store, copy, num_components=COMPONENTS, roots=SwapAfterListing([tmp_path / "data"]))
    assert store.current_fit_id("tiny", backend.digest) is None


def test_guard_decomposes_exactly_and_fixes(backend: TorchBackend, dataset: Path, fitted) -> None:
    store, outcome, _ = fitted
    k = 2
    values, vectors, alphas_ref, _ = _reference(backend, dataset, k)
    store.set_label("tiny", backend.digest, k, 0, "spurious")
    guard = Guard.load(backend, store)
    paths = sorted((dataset / "cat").iterdir())
    features = backend.features(backend.preprocess([p.read_bytes() for p in paths]))
    results = guard.score_features(features, [p.name for p in paths], class_index=k, top=0, mode="floor")
    weight, bias = (t.double().numpy() for t in backend.head())
    phi = features.double().numpy()
    logits = phi @ weight.T + bias
    floor = np.percentile(alphas_ref[:, 0], 5)
    for i, result in enumerate(results):
        assert result.class_index == k and result.image_id == paths[i].name
        assert result.logit == pytest.approx(logits[i, k], rel=1e-5, abs=1e-5)
        total = result.bias_term + result.residual + sum(c.alpha for c in result.components)
        assert total == pytest.approx(result.logit, abs=1e-4)
        assert [c.index for c in result.components] == list(np.argsort(-alphas_ref[i], kind="stable"))
        assert {c.index: c.alpha for c in result.components}[0] == pytest.approx(alphas_ref[i, 0], abs=1e-4)
        assert {c.index: c.label for c in result.components}[0] == "spurious"
        penalty = max(alphas_ref[i, 0] - floor, 0.0)
        assert result.spurious_alpha == pytest.approx(penalty, abs=1e-4)
        assert result.spufix.logit == pytest.approx(logits[i, k] - penalty, abs=1e-4)
        fixed = logits[i].copy()
        fixed[k] -= penalty
        assert result.trigger == (logits[i].argmax() == k and fixed.argmax() != k)
        assert result.predictions[0].prob == pytest.approx(softmax(logits[i : i + 1])[0].max(), rel=1e-5)
        line = result.to_dict()
        assert set(line) >= {"image", "predictions", "class", "logit", "bias_term", "residual",
                             "components", "spurious_alpha", "trigger", "spufix"}
    store.set_label("tiny", backend.digest, k, 0, "unlabeled")


def test_guard_reports_spurious_components_beyond_the_top(backend: TorchBackend, dataset: Path, fitted) -> None:
    """SPEC §3: a spurious component with a small alpha still shows, after the top N by alpha."""
    store, outcome, _ = fitted
    k, spurious = 2, (1, 3)
    fit = store.load_fit("tiny", backend.digest, outcome.meta.fit_id)
    weight, bias = backend.head()
    labels = {(k, 1): "spurious", (k, 3): "spurious", (k, 2): "not_spurious", (0, 0): "spurious"}
    guard = Guard(class_names=backend.class_names, weight=weight, bias=bias,
                  components={c: fit.components(c) for c in fit.classes}, labels=labels, fit_id="f")
    paths = sorted((dataset / "cat").iterdir())
    features = backend.features(backend.preprocess([p.read_bytes() for p in paths]))
    alphas = _reference(backend, dataset, k)[2]
    beyond_top = 0
    for top in (1, 2, 0):
        for result, row in zip(guard.score_features(features, [p.name for p in paths], class_index=k, top=top), alphas):
            order = [int(l) for l in np.argsort(-row, kind="stable")]
            head = order if top == 0 else order[:top]
            expected = head + [l for l in order if l in spurious and l not in head]
            assert [c.index for c in result.components] == expected
            assert [c.label for c in result.components if c.index in spurious] == ["spurious", "spurious"]
            beyond_top += len(expected) > len(head)
            if top == 0:  # every kept component once: the residual identity holds
                total = result.bias_term + result.residual + sum(c.alpha for c in result.components)
                assert total == pytest.approx(result.logit, abs=1e-4)
    assert beyond_top > 0  # the data do put a spurious component outside the top


def test_guard_without_fit_still_predicts(backend: TorchBackend, tmp_path: Path) -> None:
    guard = Guard.load(backend, Store(tmp_path / "store"))
    features = torch.rand(2, DIM)
    (first, _) = guard.score_features(features, ["a", "b"], mode="paper")
    assert guard.fit_id is None and first.bias_term is None and first.components == ()
    assert not first.trigger and first.spufix.logit == pytest.approx(first.logit)
    with pytest.raises(InvalidInput, match="SpuFix mode"):
        guard.score_features(features, ["a", "b"], mode="strong")


def test_evaluation_matches_metrics_on_logits(backend: TorchBackend, dataset: Path, fitted, tmp_path: Path) -> None:
    store, _, _ = fitted
    spurious = tmp_path / "spurious"
    _write_images(spurious, {"spurious_imagenet_0_dots_1": 6, "spurious_imagenet_2_text_0": 5}, seed=9)
    store.set_label("tiny", backend.digest, 0, 0, "spurious")
    guard = Guard.load(backend, store)
    outcome = run_evaluate(backend, guard, dataset, spurious, mode="paper", batch_size=4)
    result = outcome.result
    assert (result.clean_images, result.spurious_images, result.skipped_images) == (3 * PER_CLASS, 11, 1)
    assert [s[0] for s in outcome.skipped] == ["1/broken.png"]
    # independent: logits of every image by hand, AUC by the rank formula
    weight, bias = (t.double().numpy() for t in backend.head())

    def logits_of(paths: list[Path]) -> np.ndarray:
        phi = backend.features(backend.preprocess([p.read_bytes() for p in paths])).double().numpy()
        return phi @ weight.T + bias

    clean = [logits_of(sorted(p for p in (dataset / f).iterdir() if p.name != "broken.png")) for f in ("ant", "1", "cat")]
    for k, folder in ((0, "spurious_imagenet_0_dots_1"), (2, "spurious_imagenet_2_text_0")):
        spur = logits_of(sorted((spurious / folder).iterdir()))
        scores = np.r_[softmax(clean[k])[:, k], softmax(spur)[:, k]]
        truth = np.r_[np.ones(len(clean[k])), np.zeros(len(spur))]
        pairs = [(p > n) + 0.5 * (p == n) for p in scores[truth == 1] for n in scores[truth == 0]]
        row = {c.class_index: c for c in result.baseline.classes}[k]
        assert row.auc == pytest.approx(np.mean(pairs), abs=1e-6)
    # SpuFix (paper) lowers logit 0 of every image by max(alpha_0, 0) of class 0's component 0
    _, vectors, _, ids = _reference(backend, dataset, 0)
    phi_fit = backend.features(backend.preprocess([(dataset / i).read_bytes() for i in ids])).double().numpy()
    mean = (phi_fit * weight[0]).mean(0)

    def fixed(paths: list[Path]) -> np.ndarray:
        phi = backend.features(backend.preprocess([p.read_bytes() for p in paths])).double().numpy()
        alpha = ((phi * weight[0] - mean) @ vectors[0]) * vectors[0].sum()
        out = phi @ weight.T + bias
        out[:, 0] -= np.maximum(alpha, 0)
        return out

    clean_fixed = fixed(sorted((dataset / "ant").iterdir()))
    spur_fixed = fixed(sorted((spurious / "spurious_imagenet_0_dots_1").iterdir()))
    scores = np.r_[softmax(clean_fixed)[:, 0], softmax(spur_fixed)[:, 0]]
    truth = np.r_[np.ones(len(clean_fixed)), np.zeros(len(spur_fixed))]
    row = {c.class_index: c for c in result.spufix.classes}[0]
    assert row.auc == pytest.approx(roc_auc(truth, scores), abs=1e-6)
    assert row.clean_mean_prob == pytest.approx(softmax(clean_fixed)[:, 0].mean(), abs=1e-5)
    line = result.to_dict()
    assert line["spufix"]["mode"] == "paper" and {"mean_auc", "mean_ap", "classes"} <= set(line)
    clean_all = np.concatenate(clean)
    clean_y = np.repeat([0, 1, 2], [len(c) for c in clean])
    assert result.baseline.clean_accuracy == pytest.approx((clean_all.argmax(1) == clean_y).mean())
    store.set_label("tiny", backend.digest, 0, 0, "unlabeled")


def test_evaluation_of_classes_the_spurious_folder_lacks_says_so(
    backend: TorchBackend, dataset: Path, fitted, tmp_path: Path
) -> None:
    """Was INTERNAL (an assertion in the loader on no images at all), found by the request fuzzer."""
    spurious = tmp_path / "spurious"
    _write_images(spurious, {"spurious_imagenet_0_dots_1": 2}, seed=9)
    with pytest.raises(InvalidInput, match=r"no images of classes \[1, 2\]"):
        run_evaluate(backend, Guard.load(backend, fitted[0]), dataset, spurious, mode="paper", classes=[1, 2])


def test_batches_of_no_images_are_none(backend: TorchBackend) -> None:
    assert list(iter_batches([], backend, batch_size=4, read=Path.read_bytes)) == []
