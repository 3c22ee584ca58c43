"""Small pieces of the rpc layer on their own: the status mapping and the data-root checks."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
import pytest

from spurguard.server.errors import Cancelled, InvalidInput, NotFound, PermissionDenied, ResourceExhausted
from spurguard.server.serving.paths import DataRoots
from spurguard.server.rpc.health import Health
from spurguard.server.rpc.status import status_of


@pytest.mark.parametrize(
    "error, code",
    [(InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT), (NotFound("x"), grpc.StatusCode.NOT_FOUND),
     (ResourceExhausted("big"), grpc.StatusCode.RESOURCE_EXHAUSTED), (Cancelled("stop"), grpc.StatusCode.CANCELLED)],
)
def test_typed_errors_keep_their_code(error: Exception, code: grpc.StatusCode) -> None:
    status = status_of(error, "Test")
    assert status.code == code and status.message == str(error) and status.number == code.value[0]


def test_messages_are_one_line() -> None:
    assert status_of(InvalidInput("\n  first line\nsecond line"), "Test").message == "first line"
    assert len(status_of(InvalidInput("x" * 5000), "Test").message) == 1000


def test_unexpected_errors_are_internal_and_logged_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="spurguard.server"):
        status = status_of(KeyError("secret detail"), "Score")
    assert status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in status.message and "Score" in status.message and "\n" not in status.message
    assert "secret detail" in caplog.text


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "train" / "0").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, root / "link")
    return root, outside


def test_paths_resolve_under_a_root(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    roots = DataRoots([root])
    assert roots.resolve("train") == roots.resolve(str(root / "train")) == root.resolve() / "train"
    with pytest.raises(NotFound):
        roots.resolve("missing")


@pytest.mark.parametrize("path", ["link", "train/../..", "/"])
def test_paths_may_not_leave_the_roots(layout: tuple[Path, Path], path: str) -> None:
    with pytest.raises(PermissionDenied):
        DataRoots([layout[0]]).resolve(path)


def test_no_roots_means_no_datasets(layout: tuple[Path, Path]) -> None:
    with pytest.raises(PermissionDenied, match="--data-root"):
        DataRoots([]).resolve(str(layout[0] / "train"))
    with pytest.raises(InvalidInput):
        DataRoots([layout[0]]).resolve("")


def test_reading_a_file_under_the_roots(layout: tuple[Path, Path]) -> None:
    root, _ = layout
    image = root / "train" / "0" / "a.png"
    image.write_bytes(b"0123456789ab")
    roots = DataRoots([root])
    assert roots.read(image) == b"0123456789ab"
    with pytest.raises(NotFound, match="does not exist any more"):
        roots.read(image.with_name("gone.png"))
    with pytest.raises(ResourceExhausted, match="12 bytes, over the limit of 10"):
        roots.read(image, max_bytes=10)


def test_a_file_turned_into_a_link_between_check_and_open_is_refused(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file opened is the file checked: its real path is opened without following a link, so
    one swapped in after the check (even one that stays inside) is refused, not followed."""
    root, outside = layout
    image, secret = root / "train" / "0" / "a.png", outside / "secret.png"
    image.write_bytes(b"image")
    secret.write_bytes(b"secret")
    roots = DataRoots([root])
    checked = roots.real_path

    def check_then_swap(path: Path, what: str = "dataset file") -> Path:
        real = checked(path, what)
        image.unlink()
        os.symlink(secret, image)
        return real

    monkeypatch.setattr(roots, "real_path", check_then_swap)
    with pytest.raises(PermissionDenied, match="turned into a link while it was being read"):
        roots.read(image)


def test_a_file_of_a_folder_outside_the_roots_is_refused_as_outside(layout: tuple[Path, Path]) -> None:
    """Say a fit made by a server with other roots: the file is no link, so the message says where it is."""
    root, outside = layout
    (outside / "a.png").write_bytes(b"image")
    with pytest.raises(PermissionDenied, match=r"a.png' is outside the server's data roots"):
        DataRoots([root]).read(outside / "a.png")


def test_no_model_may_take_the_liveness_health_name() -> None:
    with pytest.raises(InvalidInput, match="may not be named 'liveness'"):
        Health(["", "liveness"])


@pytest.mark.parametrize("path, message", [
    ("train\x00x", "NUL character"),  # os calls raise ValueError: was INTERNAL
    ("a" * 300, "too long"),  # one name over NAME_MAX: ENAMETOOLONG, was INTERNAL
    ("a/" * 3000, "too long"),  # over PATH_MAX
])
def test_paths_that_no_file_system_takes_are_invalid_input(layout: tuple[Path, Path], path: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        DataRoots([layout[0]]).resolve(path)
