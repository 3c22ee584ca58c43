"""Device strings and CPU threads."""
from __future__ import annotations

import pytest
import torch

from spurguard.server.backends.device import (
    CPU_BATCH_SIZE,
    available_cpus,
    configure_cpu_threads,
    default_batch_size,
    resolve_device,
)
from spurguard.server.errors import FailedPrecondition, InvalidInput

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert default_batch_size(torch.device("cpu")) == CPU_BATCH_SIZE


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda(spec: str) -> None:
    with pytest.raises(FailedPrecondition, match=f"device '{spec}' requested but CUDA is not available"):
        resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range() -> None:
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(InvalidInput, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("spec", ["gpu", "cpu:1", "cuda:x", "auto:0", "", "mps"])
def test_bad_device_strings(spec: str) -> None:
    with pytest.raises(InvalidInput, match="is not one of 'auto', 'cpu', 'cuda', 'cuda:N'"):
        resolve_device(spec)


def test_threads_respect_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(available_cpus() + 3)
        configure_cpu_threads()
        assert torch.get_num_threads() == available_cpus() + 3  # an explicit OMP_NUM_THREADS wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        configure_cpu_threads()
        assert torch.get_num_threads() == available_cpus()  # lowered to what the process may use
        torch.set_num_threads(1)
        configure_cpu_threads()
        assert torch.get_num_threads() == 1  # never raised
    finally:
        torch.set_num_threads(before)
