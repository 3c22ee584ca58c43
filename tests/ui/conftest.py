"""One fitted server for every ui test (fitting is the slow part); pages and browsers per test."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from ui_support import World, fitted_world


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with fitted_world(tmp_path_factory.mktemp("ui")) as running:
        yield running
