"""Decoding fairly over gRPC: the per-request pixel budget, decompression bombs as per-image
errors, and one client's heavy images not starving another client's one-image Score.

One in-process server (BackgroundServer, port 0) serves the demo model, unfitted (scoring needs
no fit), on torch. "Heavy" images are legal: flat gray PNGs of 4000 x 4000, ~600 pixels a byte
(an 8-bit PNG cannot pass ~1030), each ~0.1 s of decoding.
"""
from __future__ import annotations

import io
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spurguard.client import Client, SpurguardClientError
from spurguard.server.rpc.app import BackgroundServer, ServerConfig, build_parser, config_from_args

from rpc_support import random_png

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from backends_support import png_with_header  # noqa: E402

HEAVY_SIDE = 4000
HEAVY_PER_REQUEST = 8
BUDGET = HEAVY_PER_REQUEST * HEAVY_SIDE**2  # --max-request-pixels: a flood request just fits
FLOODERS = 6  # clients sending heavy requests at once: up to 48 heavy images queued


def heavy_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (HEAVY_SIDE, HEAVY_SIDE), 100).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    config = ServerConfig(models=("demo",), store=tmp_path_factory.mktemp("store"), port=0, device="cpu",
                          runtime="torch", max_delay_ms=2.0, max_request_pixels=BUDGET, grace_s=1.0)
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(server.address, timeout=60) as c:
        yield c


def test_a_request_over_the_pixel_budget_is_resource_exhausted_before_decoding(client: Client) -> None:
    heavy = heavy_png()
    started = time.monotonic()
    with pytest.raises(SpurguardClientError) as caught:
        client.score("demo", [(f"h{i}", heavy) for i in range(HEAVY_PER_REQUEST + 1)])
    assert caught.value.code.name == "RESOURCE_EXHAUSTED"
    assert f"{(HEAVY_PER_REQUEST + 1) * HEAVY_SIDE**2} pixels" in caught.value.details
    assert "--max-request-pixels" in caught.value.details
    assert time.monotonic() - started < 5  # nine heavy decodes would take about a second or more


def test_bombs_fail_alone_in_a_batch_and_a_stream(client: Client) -> None:
    flat = io.BytesIO()
    Image.new("L", (2048, 2048), 90).save(flat, format="WEBP", lossless=True)
    rng = np.random.default_rng(0)
    batch = [("good0", random_png(rng)), ("forged", png_with_header(6300, 6300)), ("flat", flat.getvalue()),
             ("good1", random_png(rng))]
    for results in (client.score("demo", batch), list(client.score_stream("demo", batch))):
        assert [r.image_id for r in results] == ["good0", "forged", "flat", "good1"]
        errors = {r.image_id: r.error for r in results if r.error is not None}
        assert sorted(errors) == ["flat", "forged"]
        assert all(e.code == "INVALID_ARGUMENT" and "decompression bomb" in e.message for e in errors.values())
        assert "6300x6300" in errors["forged"].message


def _seconds(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - started


def test_heavy_images_of_one_client_do_not_starve_another_clients_score(server: BackgroundServer, client: Client) -> None:
    """Single-image Score latency while other clients keep ~48 heavy images queued stays within
    a few heavy decodes of its latency without them: first come, first served, it would wait for
    the whole queue (~24 decodes on two workers)."""
    heavy = heavy_png()
    backend = server.server.models.get("demo").backend
    decode_s = min(_seconds(lambda: backend.decode_crop(heavy)) for _ in range(3))
    light = [random_png(np.random.default_rng(1))]

    def one_image() -> float:
        return _seconds(lambda: client.score("demo", light))

    alone = statistics.median(one_image() for _ in range(10))
    stop = threading.Event()

    def flood() -> int:
        requests = 0
        with Client(server.address, timeout=120) as own:
            while not stop.is_set():
                results = own.score("demo", [(f"h{i}", heavy) for i in range(HEAVY_PER_REQUEST)])
                assert all(r.error is None for r in results)
                requests += 1
        return requests

    with ThreadPoolExecutor(FLOODERS) as pool:
        floods = [pool.submit(flood) for _ in range(FLOODERS)]
        time.sleep(2 * decode_s * HEAVY_PER_REQUEST)  # the queue fills
        try:
            crowded = statistics.median(one_image() for _ in range(10))
        finally:
            stop.set()
        assert all(f.result(timeout=120) >= 1 for f in floods)  # the heavy clients were served too
    assert crowded < alone + 6 * decode_s, f"{crowded:.3f} s among heavy clients, {alone:.3f} s alone, decode {decode_s:.3f} s"


def test_serve_takes_the_budget_as_a_flag(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--model", "demo", "--store", str(tmp_path), "--max-request-pixels", "1000"])
    assert config_from_args(args).max_request_pixels == 1000
    assert ServerConfig(models=(), store=tmp_path).max_request_pixels == 256_000_000
