"""`spurguard score`: folder expansion, batching, per-image failures and their exit status."""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

import cli_fakes as f
from cli_fakes import FakeClient, RunCli
from spurguard.client import SpurguardClientError, cli
from spurguard.vocab import IMAGE_SUFFIXES


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """root/{b/2.png, a/1.JPG, a/0.webp, c.jpeg, notes.txt, .hidden.png, .cache/x.png, empty/}."""
    for name in ["b/2.png", "a/1.JPG", "a/0.webp", "c.jpeg", "notes.txt", ".hidden.png", ".cache/x.png"]:
        path = tmp_path / "root" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    (tmp_path / "root" / "empty").mkdir()
    return tmp_path / "root"


def test_folders_expand_to_their_images_sorted_and_files_stay(images: Path) -> None:
    root = str(images)
    expanded = cli.expand_images([str(images / "c.jpeg"), root, "missing.png"])
    assert expanded == [f"{root}/c.jpeg", f"{root}/a/0.webp", f"{root}/a/1.JPG", f"{root}/b/2.png",
                        f"{root}/c.jpeg", "missing.png"]


def test_a_folder_stands_for_every_format_the_server_decodes(tmp_path: Path) -> None:
    """GIF, BMP, TIFF, PPM and AVIF score when named one by one, so a folder must not skip them."""
    names = ["a.gif", "b.BMP", "c.tif", "d.tiff", "e.ppm", "f.pgm", "g.avif", "h.jpg", "i.png", "j.webp", "k.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert cli.expand_images([str(tmp_path)]) == [str(tmp_path / name) for name in names[:-1]]


def test_a_folder_without_images_is_a_usage_error(cli_run: RunCli, images: Path) -> None:
    fake = FakeClient()
    outcome = cli_run(fake, "score", "--model", "tiny", str(images / "a"), str(images / "empty"))
    assert outcome.code == cli.EXIT_USAGE
    assert f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {images / 'empty'}" in outcome.err
    assert fake.called("score") == []


def test_json_lines_in_input_order_sent_in_batches(cli_run: RunCli, images: Path) -> None:
    fake = FakeClient()
    outcome = cli_run(
        fake, "score", "--json", "--model", "tiny", "--class", "3", "--top", "0", "--spufix", "paper",
        "--batch-size", "3", str(images), str(images / "c.jpeg"),
    )
    assert outcome.code == cli.EXIT_OK
    lines = [json.loads(line) for line in outcome.out.splitlines()]
    expected = cli.expand_images([str(images), str(images / "c.jpeg")])
    assert [line["image"] for line in lines] == expected
    calls = fake.called("score")
    assert [len(args[1]) for args, _ in calls] == [3, 2]
    assert calls[0][0][1][0] == (expected[0], b"a/0.webp")  # the bytes the CLI read, under the path given
    assert calls[0][1] == {"class_index": 3, "top": 0, "spufix": "paper", "batch_size": 3}
    assert outcome.err == ""  # --json and not a terminal: no progress


def test_failed_images_get_error_lines_and_exit_3(cli_run: RunCli, images: Path) -> None:
    (images / "a" / "1.JPG").write_bytes(f.CORRUPT)
    outcome = cli_run(FakeClient(), "score", "--json", "--model", "tiny", str(images / "a"), "missing.png")
    assert outcome.code == cli.EXIT_PARTIAL == 3
    lines = [json.loads(line) for line in outcome.out.splitlines()]
    assert [sorted(line) for line in lines] == [sorted(f.score_result("x").to_dict()), ["error", "image"], ["error", "image"]]
    assert lines[1]["error"] == {"code": "INVALID_ARGUMENT", "message": "cannot decode"}
    assert lines[2]["image"] == "missing.png" and lines[2]["error"]["code"] == "NOT_FOUND"
    assert "cannot read missing.png" in lines[2]["error"]["message"]
    assert outcome.err == "spurguard: 2 of 3 images failed\n"


def test_only_unreadable_files_never_call_the_server(cli_run: RunCli) -> None:
    fake = FakeClient()
    outcome = cli_run(fake, "score", "--model", "tiny", "gone.png")
    assert outcome.code == cli.EXIT_PARTIAL
    assert fake.called("score") == []
    assert outcome.out.splitlines()[1].split() == ["gone.png", "error:", "NOT_FOUND", "-", "-", "-", "-"]
    assert outcome.err.split("\n", 1)[1] == (  # after the progress line
        "spurguard: gone.png: NOT_FOUND: cannot read gone.png: No such file or directory\n"
        "spurguard: 1 of 1 images failed\n"
    )


def test_human_table_and_plain_progress(cli_run: RunCli, images: Path) -> None:
    outcome = cli_run(FakeClient(), "score", "--model", "tiny", str(images / "a"))
    lines = outcome.out.splitlines()
    assert lines[0].split()[:2] == ["IMAGE", "PREDICTED"]
    assert lines[1].split() == [str(images / "a" / "0.webp"), "cat", "0.750", "yes", "3.25", "dog", "(0.750)"]
    assert len(lines) == 3
    assert outcome.err.startswith("score [") and "2/2 images" in outcome.err  # plain line, stderr not a terminal


def test_a_call_failure_stops_with_the_status(cli_run: RunCli, images: Path) -> None:
    fake = FakeClient()
    fake.error = SpurguardClientError(grpc.StatusCode.NOT_FOUND, "no model 'nope'")
    outcome = cli_run(fake, "score", "--json", "--model", "nope", str(images))
    assert outcome.code == cli.EXIT_ERROR
    assert outcome.err == "spurguard: error: NOT_FOUND: no model 'nope'\n"
    assert json.loads(outcome.out) == {"error": {"code": "NOT_FOUND", "message": "no model 'nope'"}}  # SPEC section 3
