"""The planted backbone as a plain module and as TorchScript, wrapped in backends."""
from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from spurguard.server.backends import TorchBackend
from spurguard.server.engine import ClassComponents
from visualize_support import SIZE, PlantedCNN, make_backend, planted_components


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: threads only add overhead, and the test machines share two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def backend() -> TorchBackend:
    return make_backend(PlantedCNN())


@pytest.fixture(scope="session")
def traced_backend() -> TorchBackend:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: deprecated, supported
        traced = torch.jit.trace(PlantedCNN().eval(), torch.zeros(2, 3, SIZE, SIZE))
    return make_backend(traced)


@pytest.fixture(scope="session")
def components() -> ClassComponents:
    return planted_components()
