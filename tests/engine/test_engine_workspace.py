"""The neural PCA's reused work buffers: reuse, bounds, one holder at a time, and results that do
not depend on what a reused buffer held before."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from spurguard.server.engine import npca
from spurguard.server.engine.workspace import Workspace

CPU = torch.device("cpu")


def test_a_given_buffer_serves_the_next_request_that_fits_it() -> None:
    pool = Workspace(kept=4)
    first = pool.take((30, 40), torch.float64, CPU)
    pool.give(first)
    smaller = pool.take((20, 50), torch.float64, CPU)  # 1000 <= 1200 elements: the same memory
    assert smaller.shape == (20, 50) and smaller.data_ptr() == first.data_ptr()
    other = pool.take((20, 50), torch.float64, CPU)  # the buffer is taken: a new one
    assert other.data_ptr() != smaller.data_ptr()
    pool.give(smaller)
    assert pool.take((31, 40), torch.float64, CPU).data_ptr() != first.data_ptr()  # too small
    assert pool.take((30, 40), torch.float32, CPU).dtype == torch.float32  # never another dtype's buffer


def test_the_smallest_fitting_buffer_is_taken_and_at_most_kept_are_held() -> None:
    pool = Workspace(kept=2)
    buffers = [pool.take((n,), torch.float64, CPU) for n in (100, 200, 300)]
    pointers = [b.data_ptr() for b in buffers]
    for buffer in buffers:
        pool.give(buffer)
    # the oldest (100) was dropped; of 200 and 300, a request for 150 gets 200
    assert pool.take((150,), torch.float64, CPU).data_ptr() == pointers[1]
    assert pool.take((50,), torch.float64, CPU).data_ptr() == pointers[2]
    assert pool.take((50,), torch.float64, CPU).data_ptr() not in pointers


def test_concurrent_holders_never_share_a_buffer() -> None:
    pool, clashes = Workspace(kept=3), []

    def worker(mark: float) -> None:
        for _ in range(200):
            buffer = pool.take((64,), torch.float64, CPU)
            buffer.fill_(mark)
            time.sleep(0)
            if not bool((buffer == mark).all()):
                clashes.append(mark)
            pool.give(buffer)

    threads = [threading.Thread(target=worker, args=(float(i),)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clashes == []


def test_components_do_not_depend_on_what_reused_buffers_held(large_problem, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows, Gram matrix, Lanczos basis and projected matrix from buffers full of NaN give the
    same components as fresh memory (the Lanczos path: d = 512, 300 images a class)."""
    p = large_problem

    def fit_class_0() -> npca.ClassComponents:
        fit = npca.NeuralPCAFit(p.weight)
        rows = p.class_rows(0)
        fit.update(rows, np.zeros(len(rows), dtype=np.int64))
        return fit.finalize_class(0, 8, method="lanczos")

    monkeypatch.setattr(npca, "WORKSPACE", Workspace(kept=0))  # nothing kept: every buffer fresh
    fresh = fit_class_0()
    dirty = Workspace(kept=8)
    poisoned = [torch.full((600_000,), float("nan"), dtype=torch.float64) for _ in range(4)]
    for buffer in poisoned:
        dirty.give(buffer)
    monkeypatch.setattr(npca, "WORKSPACE", dirty)
    reused = fit_class_0()
    again = [dirty.take((600_000,), torch.float64, CPU).data_ptr() for _ in range(4)]
    assert sorted(again) == sorted(b.data_ptr() for b in poisoned)  # all four were used and given back
    np.testing.assert_allclose(reused.eigenvalues, fresh.eigenvalues, rtol=1e-12)
    np.testing.assert_allclose(reused.vectors, fresh.vectors, atol=1e-10)
    assert reused.total_variance == pytest.approx(fresh.total_variance, rel=1e-12)
