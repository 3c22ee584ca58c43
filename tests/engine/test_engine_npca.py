"""Neural PCA fit: against np.cov + eigh, streaming/merge invariance, rank deficiency, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from spurguard.server.engine import npca
from spurguard.server.engine import (
    ClassStatistics,
    NeuralPCAFit,
    fit_alphas,
    fit_components,
    top_eigenpairs,
)
from spurguard.server.errors import FailedPrecondition, InvalidInput

L = 10


def projector_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Spectral norm of the difference of the projectors onto two row spaces (sin of the largest principal angle)."""
    return float(np.linalg.norm(a.T @ a - b.T @ b, 2))


@pytest.mark.parametrize("method", ["lanczos", "dense", "auto"])
def test_matches_float64_reference(large_problem, ref_pca, method):
    fitted = fit_components(large_problem.weight, large_problem.features, large_problem.labels, L, method=method)
    assert sorted(fitted) == [0, 1, 2]
    for k, comp in fitted.items():
        ref = ref_pca(large_problem, k)
        assert comp.class_index == k and comp.count == len(ref.activations)
        np.testing.assert_allclose(comp.mean, ref.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(comp.eigenvalues, ref.eigenvalues[:L], rtol=1e-9)
        assert np.all(np.diff(comp.eigenvalues) < 0)
        assert projector_distance(comp.vectors, ref.vectors[:, :L].T) < 1e-8
        # Each vector is the reference one up to sign, and the sign rule <1, v> >= 0 holds.
        cosines = np.abs(np.sum(comp.vectors * ref.vectors[:, :L].T, axis=1))
        np.testing.assert_allclose(cosines, 1.0, atol=1e-9)
        assert np.all(comp.vectors.sum(axis=1) >= 0)
        np.testing.assert_allclose(comp.vectors @ comp.vectors.T, np.eye(L), atol=1e-10)
        assert comp.total_variance == pytest.approx(np.trace(ref.cov), rel=1e-12)
        np.testing.assert_allclose(
            comp.explained_variance, ref.eigenvalues[:L] / ref.eigenvalues.sum(), rtol=1e-9
        )
        alphas = fit_alphas(comp, large_problem.weight[k], large_problem.class_rows(k))
        expected = ref.alphas(large_problem.class_rows(k), large_problem.weight[k])[:, :L]
        scale = np.abs(expected).max(axis=0)
        np.testing.assert_allclose(alphas, expected, rtol=1e-4, atol=1e-4 * scale.max())
        # The top components are the planted structure: they explain most of the variance.
        assert comp.explained_variance[:3].sum() > 0.5


def test_planted_eigenvalues_are_well_separated(large_problem, ref_pca):
    """Guards the fixture: subspace comparisons above are meaningful only with a spectral gap."""
    values = ref_pca(large_problem, 0).eigenvalues
    assert np.all(values[:4] / values[1:5] > 1.5)


def statistics_of(fit: NeuralPCAFit) -> dict[int, tuple[int, np.ndarray, np.ndarray]]:
    stats = {k: fit.statistics(k) for k in fit.classes_seen}
    return {k: (s.count, s.mean.numpy(), s.scatter.numpy()) for k, s in stats.items()}


def assert_same_statistics(a: NeuralPCAFit, b: NeuralPCAFit) -> None:
    sa, sb = statistics_of(a), statistics_of(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k][0] == sb[k][0]
        np.testing.assert_allclose(sa[k][1], sb[k][1], rtol=1e-12, atol=1e-12)
        scale = np.abs(sb[k][2]).max()
        np.testing.assert_allclose(sa[k][2], sb[k][2], rtol=1e-11, atol=1e-12 * scale)


def test_streaming_in_small_batches_in_any_order_equals_one_batch(small_problem):
    p = small_problem
    whole = NeuralPCAFit(p.weight)
    whole.update(p.features, p.labels)
    rng = np.random.default_rng(5)
    cuts = np.sort(rng.choice(np.arange(1, len(p.labels)), size=60, replace=False))
    batches = list(zip(np.split(p.features, cuts), np.split(p.labels, cuts)))
    for order in (range(len(batches)), reversed(range(len(batches))), rng.permutation(len(batches))):
        streamed = NeuralPCAFit(torch.from_numpy(p.weight))
        for i in order:
            streamed.update(torch.from_numpy(batches[i][0]), torch.from_numpy(batches[i][1]))
        assert_same_statistics(streamed, whole)
    one = whole.finalize_class(2, 6)
    again = streamed.finalize_class(2, 6)
    np.testing.assert_allclose(again.eigenvalues, one.eigenvalues, rtol=1e-10)
    assert projector_distance(again.vectors, one.vectors) < 1e-9


def test_merge_of_partial_fits_equals_fit_of_union(small_problem):
    p = small_problem
    whole = NeuralPCAFit(p.weight)
    whole.update(p.features, p.labels)
    # The first part never sees class 3, so merge must also adopt classes it lacks.
    first = p.labels != 3
    first[np.flatnonzero(first)[::2]] = False
    part_a, part_b = NeuralPCAFit(p.weight), NeuralPCAFit(p.weight)
    part_a.update(p.features[first], p.labels[first])
    part_b.update(p.features[~first], p.labels[~first])
    assert 3 not in part_a.classes_seen
    part_a.merge(part_b)
    assert part_b.classes_seen == []
    assert_same_statistics(part_a, whole)


def test_class_statistics_merge_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.random((50, 7))
    a, b = ClassStatistics.empty(7), ClassStatistics.empty(7)
    a.update(torch.from_numpy(x[:1]))
    b.update(torch.from_numpy(x[1:]))
    a.merge(b)
    assert a.count == 50
    np.testing.assert_allclose(a.mean.numpy(), x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(a.covariance().numpy(), np.cov(x, rowvar=False), rtol=1e-12)


def test_finalize_frees_the_class_and_unseen_classes_fail(small_problem):
    p = small_problem
    fit = NeuralPCAFit(p.weight)
    keep = p.labels != 1
    fit.update(p.features[keep], p.labels[keep])
    assert fit.classes_seen == [0, 2, 3]
    with pytest.raises(FailedPrecondition, match="class 1"):
        fit.finalize_class(1)
    fit.finalize_class(0, 5)
    assert fit.classes_seen == [2, 3]
    with pytest.raises(FailedPrecondition):
        fit.finalize_class(0)
    with pytest.raises(InvalidInput):
        fit.finalize_class(4)
    with pytest.raises(InvalidInput):
        fit.finalize_class(2, 0)


def test_rank_deficient_classes_keep_at_most_their_rank(problem_factory, ref_pca):
    p = problem_factory(seed=4, num_classes=3, dim=30, per_class=[5, 1, 8])
    features, labels = p.features.copy(), p.labels
    # Class 2: eight images but only three distinct ones, so its covariance has rank 2.
    rows2 = np.flatnonzero(labels == 2)
    features[rows2] = features[rows2[[0, 1, 2, 0, 1, 2, 0, 1]]]
    fitted = fit_components(p.weight, features, labels, L)

    five = fitted[0]  # n_k = 5 <= L: at most n_k - 1 = 4 components
    ref = ref_pca(p, 0)
    assert five.num_components == 4
    np.testing.assert_allclose(five.eigenvalues, ref.eigenvalues[:4], rtol=1e-9)
    assert projector_distance(five.vectors, ref.vectors[:, :4].T) < 1e-8
    # All the class's variance is in the kept components.
    assert five.explained_variance.sum() == pytest.approx(1.0, rel=1e-12)

    single = fitted[1]  # one image: no covariance, no components
    assert single.num_components == 0 and single.vectors.shape == (0, 30)
    assert single.total_variance == 0.0
    np.testing.assert_allclose(single.mean, p.class_rows(1)[0] * p.weight[1], rtol=1e-7)

    duplicated = fitted[2]
    assert duplicated.num_components == 2
    assert duplicated.eigenvalues.min() > 1e-6 * duplicated.eigenvalues.max()


def test_top_eigenpairs_is_deterministic_and_methods_agree():
    rng = np.random.default_rng(6)
    basis = rng.standard_normal((600, 40))
    cov = basis @ np.diag(0.8 ** np.arange(40)) @ basis.T + 1e-3 * np.eye(600)
    v1, u1 = top_eigenpairs(cov, 20, method="lanczos")
    v2, u2 = top_eigenpairs(cov, 20, method="lanczos")
    v3, u3 = top_eigenpairs(cov, 20, method="dense")
    assert np.array_equal(v1, v2) and np.array_equal(u1, u2)
    np.testing.assert_allclose(v1, v3, rtol=1e-10)
    np.testing.assert_allclose(u1, u3, atol=1e-8)  # the sign rule makes the vectors identical
    assert top_eigenpairs(np.zeros((5, 5)), 3)[0].shape == (0,)
    with pytest.raises(InvalidInput):
        top_eigenpairs(np.zeros((4, 5)), 2)


@pytest.mark.parametrize(
    "features, labels",
    [
        (np.zeros((3, 39), np.float32), [0, 1, 2]),  # wrong feature dim
        (np.zeros(40, np.float32), [0]),  # not 2-D
        (np.zeros((3, 40), np.float32), [0, 1]),  # labels of the wrong length
        (np.zeros((3, 40), np.float32), [0, 1, 4]),  # label out of range
        (np.zeros((3, 40), np.float32), [0.0, 1.0, 2.0]),  # non-integer labels
        (np.full((3, 40), np.nan, np.float32), [0, 1, 2]),  # not finite
        (np.zeros((3, 40), np.int64), [0, 1, 2]),  # integer features
    ],
)
def test_wrong_inputs_are_invalid(small_problem, features, labels):
    fit = NeuralPCAFit(small_problem.weight)
    with pytest.raises(InvalidInput):
        fit.update(features, labels)


def test_finiteness_is_exact_whatever_the_sum_does(small_problem):
    """The check sums in the input's dtype: large finite values whose float32 sum overflows are
    still accepted, and a single infinity or NaN among ordinary values is still refused."""
    fit = NeuralPCAFit(small_problem.weight)
    huge = np.full((3, 40), 1e37, np.float32)  # sum 1.2e39: inf in float32
    with np.errstate(over="ignore"):
        assert not np.isfinite(huge.sum(dtype=np.float32))
    fit.update(huge, [0, 1, 2])
    for bad in (np.inf, -np.inf, np.nan):
        rows = np.ones((3, 40), np.float32)
        rows[1, 7] = bad
        with pytest.raises(InvalidInput, match="NaN or infinity"):
            fit.update(rows, [0, 1, 2])


def test_merge_of_different_heads_is_invalid(small_problem):
    other = NeuralPCAFit(small_problem.weight * 2)
    with pytest.raises(InvalidInput):
        NeuralPCAFit(small_problem.weight).merge(other)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_matches_cpu(small_problem):
    p = small_problem
    on_gpu = NeuralPCAFit(p.weight, device="cuda")
    on_gpu.update(torch.from_numpy(p.features).cuda(), torch.from_numpy(p.labels).cuda())
    gpu = on_gpu.finalize_class(0, 5)
    cpu = fit_components(p.weight, p.features, p.labels, 5)[0]
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-9)
    assert projector_distance(gpu.vectors, cpu.vectors) < 1e-8


def gram_and_scatter_fits(p, k: int, num: int):
    """Class k fitted from its kept rows (the Gram path) and, on a copy, from its scatter."""
    kept, scattered = NeuralPCAFit(p.weight), NeuralPCAFit(p.weight)
    for fit in (kept, scattered):
        fit.update(p.features, p.labels)
    assert kept.statistics(k).rows is not None
    scattered.statistics(k)._to_scatter()
    assert scattered.statistics(k).rows is None
    return kept.finalize_class(k, num), scattered.finalize_class(k, num)


@pytest.mark.parametrize(
    "per_class, rank",
    [
        ([40, 2], 6),  # n < d, and n == 2: one component
        ([60, 30], 60),  # full-rank class, n < d
        ([64, 3], 3),  # n == d for class 0
    ],
)
def test_gram_path_equals_scatter_path_and_reference(problem_factory, ref_pca, per_class, rank):
    p = problem_factory(seed=8, num_classes=2, dim=64, per_class=per_class, rank=rank)
    for k, n in enumerate(per_class):
        num = min(8, n - 1)
        gram, scatter = gram_and_scatter_fits(p, k, num)
        ref = ref_pca(p, k)
        for comp in (gram, scatter):
            assert comp.num_components == num
            np.testing.assert_allclose(comp.eigenvalues, ref.eigenvalues[:num], rtol=1e-9)
            assert projector_distance(comp.vectors, ref.vectors[:, :num].T) < 1e-8
            np.testing.assert_allclose(comp.vectors @ comp.vectors.T, np.eye(num), atol=1e-10)
            assert comp.total_variance == pytest.approx(np.trace(ref.cov), rel=1e-12)
        np.testing.assert_allclose(gram.vectors, scatter.vectors, atol=1e-8)  # same sign rule
        np.testing.assert_allclose(gram.mean, scatter.mean, rtol=1e-12)


def test_gram_path_of_rank_deficient_and_repeated_classes(problem_factory, ref_pca):
    p = problem_factory(seed=9, num_classes=1, dim=50, per_class=20)
    rows = p.features.copy()
    rows[10:] = rows[:10]  # twenty images, ten distinct: rank 9
    p = type(p)(rows, p.labels, p.weight, p.bias)
    gram, scatter = gram_and_scatter_fits(p, 0, 15)
    ref = ref_pca(p, 0)
    for comp in (gram, scatter):
        assert comp.num_components == 9
        np.testing.assert_allclose(comp.eigenvalues, ref.eigenvalues[:9], rtol=1e-9)
        assert projector_distance(comp.vectors, ref.vectors[:, :9].T) < 1e-8


def test_block_lanczos_converges_on_repeated_and_decaying_spectra():
    rng = np.random.default_rng(10)
    basis = np.linalg.qr(rng.standard_normal((700, 700)))[0]
    spectrum = np.concatenate([[5.0, 5.0, 5.0], 4.0 * 0.9 ** np.arange(697)])  # a triple top
    cov = torch.from_numpy((basis * spectrum) @ basis.T)
    found = npca._block_lanczos(cov, 20)
    assert found is not None  # converged, no dense fallback
    values, vectors = found
    np.testing.assert_allclose(values.numpy(), np.sort(spectrum)[::-1][:20], rtol=1e-10)
    expected = basis[:, np.argsort(spectrum)[::-1][:20]]
    assert projector_distance(vectors.numpy().T, expected.T) < 1e-8
    # the public entry point gives the same pairs, whichever solver
    lanczos, dense = top_eigenpairs(cov, 20, method="lanczos"), top_eigenpairs(cov, 20, method="dense")
    np.testing.assert_allclose(lanczos[0], dense[0], rtol=1e-10)
    assert projector_distance(lanczos[1], dense[1]) < 1e-8


def test_merge_across_the_row_to_scatter_switch(problem_factory):
    p = problem_factory(seed=11, num_classes=2, dim=30, per_class=[50, 12])
    whole = NeuralPCAFit(p.weight)
    whole.update(p.features, p.labels)
    assert whole.statistics(0).rows is None and whole.statistics(1).rows is not None
    halves = np.arange(len(p.labels)) % 2 == 0  # 25 + 25 rows of class 0: each half keeps rows
    part_a, part_b = NeuralPCAFit(p.weight), NeuralPCAFit(p.weight)
    part_a.update(p.features[halves], p.labels[halves])
    part_b.update(p.features[~halves], p.labels[~halves])
    assert part_a.statistics(0).rows is not None and part_b.statistics(0).rows is not None
    part_a.merge(part_b)
    assert part_a.statistics(0).rows is None  # 50 > d rows: switched to the scatter
    assert part_a.statistics(1).rows is not None  # 12 <= d rows: still kept
    assert_same_statistics(part_a, whole)
    for k in (0, 1):
        merged, one = part_a.finalize_class(k, 5), whole.finalize_class(k, 5)
        np.testing.assert_allclose(merged.eigenvalues, one.eigenvalues, rtol=1e-10)
        assert projector_distance(merged.vectors, one.vectors) < 1e-9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["lanczos", "dense"])
def test_cuda_gram_path_matches_cpu(large_problem, method):
    p = large_problem  # 300 rows a class, d = 512: the Gram path, solved on the GPU
    on_gpu = NeuralPCAFit(p.weight, device="cuda")
    on_gpu.update(torch.from_numpy(p.features).cuda(), torch.from_numpy(p.labels).cuda())
    assert on_gpu.statistics(0).rows is not None
    gpu = on_gpu.finalize_class(0, 10, method=method)
    cpu = fit_components(p.weight, p.features, p.labels, 10)[0]
    np.testing.assert_allclose(gpu.eigenvalues, cpu.eigenvalues, rtol=1e-9)
    assert projector_distance(gpu.vectors, cpu.vectors) < 1e-8


def test_class_statistics_taken_out_and_rebuilt_from_their_scatter_merge_like_the_whole(problem_factory):
    """What a shard of a sharded fit does: take a class's statistics out of its fit, keep them as
    rows or (count, mean, scatter), and a merging fit absorbs them class by class."""
    p = problem_factory(seed=12, num_classes=2, dim=20, per_class=[66, 9])  # 22 > d rows of class 0 a part
    whole = NeuralPCAFit(p.weight)
    whole.update(p.features, p.labels)
    thirds = np.arange(len(p.labels)) % 3
    merged, kinds = NeuralPCAFit(p.weight), []
    for part in range(3):
        fit = NeuralPCAFit(p.weight)
        fit.update(p.features[thirds == part], p.labels[thirds == part])
        for k in fit.classes_seen:
            stats = fit.take_class(k)
            kinds.append(stats.rows is None)
            if stats.rows is None:  # more rows than d in this part: kept as the scatter
                stats = ClassStatistics.from_scatter(stats.count, stats.mean.numpy(), stats.scatter.numpy())
            merged.merge_class(k, stats)
        assert fit.classes_seen == []
    assert set(kinds) == {False, True}  # class 1's parts keep rows, class 0's (mostly) their scatters
    assert_same_statistics(merged, whole)
    with pytest.raises(InvalidInput, match="out of range"):
        merged.merge_class(2, ClassStatistics.empty(20))
    with pytest.raises(InvalidInput, match="a \\[d, d\\] scatter"):
        ClassStatistics.from_scatter(3, np.zeros(20), np.zeros((20, 19)))
