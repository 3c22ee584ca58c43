"""The CLI's folder expansion, the server's dataset listing and its decoder share one format table."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, features

from spurguard.client.cli import commands
from spurguard.vocab.formats import IMAGE_FORMATS, IMAGE_SUFFIXES
from spurguard.server import datasets
from spurguard.server.backends import images


def test_the_three_users_take_the_one_table() -> None:
    assert commands.IMAGE_SUFFIXES is IMAGE_SUFFIXES and datasets.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert images.FORMATS == tuple(IMAGE_FORMATS)


def test_every_suffix_is_one_pil_registers_for_its_format() -> None:
    Image.init()
    registered = Image.registered_extensions()
    assert {suffix: registered.get(suffix) for suffix in IMAGE_SUFFIXES} == {
        suffix: name for name, suffixes in IMAGE_FORMATS.items() for suffix in suffixes
    }


@pytest.mark.parametrize("name", sorted(IMAGE_FORMATS))
def test_the_decoder_opens_every_listed_format(name: str) -> None:
    if name == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (200, 10, 10)).save(buffer, format=name)
    assert images.decode_image(buffer.getvalue()).size == (6, 4)


def test_the_dataset_listing_takes_every_listed_suffix(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    for suffix in IMAGE_SUFFIXES + (".txt",):
        (tmp_path / "0" / f"x{suffix.upper()}").write_bytes(b"x")
    listed = datasets.list_image_folder(tmp_path, datasets.ClassResolver(["cat"]))
    assert sorted(entry.path.suffix.lower() for entry in listed) == sorted(IMAGE_SUFFIXES)
