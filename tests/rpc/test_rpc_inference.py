"""The Open Inference Protocol (KServe v2) on spurguard's port, driven by plain tritonclient.

One in-process server serves `tiny`, a TinyCNN backend built here (runtime torch), fitted on
every class with components 0 and 1 of each labelled spurious, so SPURIOUS_ALPHA and TRIGGER
carry something. ModelInfer's numbers are checked against spurguard's own Score for the same images
and LOGITS against a float64 reference of the head over the backend's features.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2 as oip
from tritonclient.utils import InferenceServerException

from spurguard.client import Client, FitSummary, ScoreResult
from spurguard.server.backends import PreprocessConfig, TorchBackend
from spurguard.server.errors import InvalidInput
from spurguard.server.rpc.app import BackgroundServer, ServerConfig, SpurguardServer
from spurguard.server.rpc.inference import read_images

from rpc_support import Gated, random_png

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from backends_support import CLASSES, FEATURES, SIZE, TinyCNN  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PER_CLASS = 12
IMAGES = 10
OUTPUT_NAMES = ["LOGITS", "PREDICTION", "SPURIOUS_ALPHA", "TRIGGER", "SPUFIX_LOGITS"]


class GatedCNN(Gated, TinyCNN):
    """TinyCNN whose forward can be held (a model that is still warming up)."""


def _backend(module: TinyCNN, name: str = "tiny", bias: torch.Tensor | None = None) -> TorchBackend:
    generator = torch.Generator().manual_seed(5)
    return TorchBackend(
        name=name,
        digest="2" * 64,
        backbone=module.eval(),
        weight=torch.randn(CLASSES, FEATURES, generator=generator),
        bias=torch.randn(CLASSES, generator=generator) if bias is None else bias,
        preprocess_config=PreprocessConfig(SIZE, 20, "bilinear", (0.5,) * 3, (0.25,) * 3),
        device="cpu",
        max_batch_size=4,  # a request of IMAGES spans batches
        runtime="torch",
    )


@pytest.fixture(scope="module")
def backend(images: list[bytes]) -> TorchBackend:
    """A head whose bias evens out the classes over `images`: close calls, which SpuFix can flip."""
    torch.manual_seed(4)
    module = TinyCNN()
    plain = _backend(module)
    return _backend(module, bias=plain.head()[1] - plain.logits(plain.features(plain.preprocess(images))).mean(0))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    for k in range(CLASSES):
        (root / str(k)).mkdir()
        for i in range(PER_CLASS):
            (root / str(k) / f"{i:02d}.png").write_bytes(random_png(rng))
    return root


@pytest.fixture(scope="module")
def server(backend: TorchBackend, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    config = ServerConfig(models=(), store=tmp_path_factory.mktemp("store"), port=0, data_roots=(data,),
                          device="cpu", runtime="torch", max_delay_ms=2.0, max_request_images=16, grace_s=1.0)
    with BackgroundServer(config, backends=[backend]) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer, data: Path) -> Iterator[Client]:
    """spurguard's own client, after the fit and the spurious labels."""
    with Client(server.address, timeout=30) as c:
        *_, summary = c.fit("tiny", str(data), num_components=3)
        assert isinstance(summary, FitSummary) and len(summary.classes) == CLASSES
        for k in range(CLASSES):
            for component in (0, 1):
                c.label("tiny", k, component, "spurious")
        yield c


@pytest.fixture(scope="module")
def triton_client(server: BackgroundServer, client: Client) -> Iterator[triton.InferenceServerClient]:
    with contextlib.closing(triton.InferenceServerClient(server.address)) as c:
        yield c


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(2)
    return [random_png(rng, size=24) for _ in range(IMAGES)]


def _bytes_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def _pixels_input(pixels: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return tensor


def _assert_matches_score(result: triton.InferResult, scores: list[ScoreResult]) -> None:
    """Every output agrees with Score's numbers for the same images (and the same options)."""
    logits, fixed = result.as_numpy("LOGITS"), result.as_numpy("SPUFIX_LOGITS")
    prediction, alpha, trigger = (result.as_numpy(n) for n in ("PREDICTION", "SPURIOUS_ALPHA", "TRIGGER"))
    assert logits.shape == fixed.shape == (len(scores), CLASSES) and logits.dtype == fixed.dtype == np.float32
    assert prediction.dtype == np.int32 and alpha.dtype == np.float32 and trigger.dtype == np.bool_
    rows = np.arange(len(scores))
    np.testing.assert_array_equal(prediction, [s.predictions[0].class_index for s in scores])
    np.testing.assert_allclose(logits[rows, prediction], [s.predictions[0].logit for s in scores], rtol=1e-5)
    np.testing.assert_allclose(alpha, [s.spurious_alpha for s in scores], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trigger, [s.trigger for s in scores])
    analysed = [s.class_index for s in scores]
    np.testing.assert_allclose(fixed[rows, analysed], [s.spufix.logit for s in scores], rtol=1e-5)


def _reference_logits(backend: TorchBackend, images: list[bytes] | list[np.ndarray]) -> np.ndarray:
    """The head in float64 over the backend's own features: independent of the Guard's math."""
    features = backend.features(backend.preprocess(images)).numpy().astype(np.float64)
    weight, bias = (t.numpy().astype(np.float64) for t in backend.head())
    return features @ weight.T + bias


def _code(call: object) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return caught.value.status(), caught.value.message()


# ---- health and metadata ----


def test_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("tiny") and triton_client.is_model_ready("tiny", "1")
    assert triton_client.get_server_metadata().name == "spurguard"
    metadata = triton_client.get_model_metadata("tiny", as_json=True)
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == ("tiny", ["1"], "spurguard")
    assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": ["-1"]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in metadata["outputs"]] == [
        ("LOGITS", "FP32", ["-1", str(CLASSES)]), ("PREDICTION", "INT32", ["-1"]), ("SPURIOUS_ALPHA", "FP32", ["-1"]),
        ("TRIGGER", "BOOL", ["-1"]), ("SPUFIX_LOGITS", "FP32", ["-1", str(CLASSES)]),
    ]
    config = triton_client.get_model_config("tiny").config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == ("tiny", "spurguard", "spurguard", 16)
    assert [(i.name, i.dims) for i in config.input] == [("IMAGE", [1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("LOGITS", [CLASSES]), ("PREDICTION", [1]), ("SPURIOUS_ALPHA", [1]), ("TRIGGER", [1]),
        ("SPUFIX_LOGITS", [CLASSES]),
    ]
    assert config.parameters["spufix_default"].string_value == "floor"


def test_reflection_lists_both_services(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=5))
    assert {"spurguard.v1.Spurguard", "inference.GRPCInferenceService"} <= {s.name for s in reply.list_services_response.service}


# ---- ModelInfer ----


def test_infer_bytes_matches_score_and_the_head(
    triton_client: triton.InferenceServerClient, client: Client, backend: TorchBackend, images: list[bytes]
) -> None:
    result = triton_client.infer("tiny", [_bytes_input(images)])
    assert [o.name for o in result.get_response().outputs] == OUTPUT_NAMES
    scores = client.score("tiny", images)
    _assert_matches_score(result, scores)
    assert result.as_numpy("SPURIOUS_ALPHA").max() > 0 and result.as_numpy("TRIGGER").any()  # the labels take part
    np.testing.assert_allclose(result.as_numpy("LOGITS"), _reference_logits(backend, images), rtol=1e-4, atol=1e-5)


def test_infer_uint8_pixels_and_bytes_of_shape_n_by_1(
    triton_client: triton.InferenceServerClient, client: Client, backend: TorchBackend
) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, (6, 22, 26, 3), dtype=np.uint8)
    result = triton_client.infer("tiny", [_pixels_input(pixels)])
    _assert_matches_score(result, client.score("tiny", list(pixels)))
    np.testing.assert_allclose(result.as_numpy("LOGITS"), _reference_logits(backend, list(pixels)), rtol=1e-4, atol=1e-5)
    column = triton.InferInput("IMAGE", [2, 1], "BYTES")
    column.set_data_from_numpy(np.array([[random_png(np.random.default_rng(k))] for k in range(2)], dtype=np.object_))
    assert triton_client.infer("tiny", [column]).as_numpy("LOGITS").shape == (2, CLASSES)


@pytest.mark.parametrize("mode", ["paper", "floor"])
def test_parameters_and_requested_outputs(
    triton_client: triton.InferenceServerClient, client: Client, images: list[bytes], mode: str
) -> None:
    """class_index and spufix act as in Score; only the outputs asked for come back, in that order."""
    asked = [triton.InferRequestedOutput(name) for name in ("TRIGGER", "SPUFIX_LOGITS", "SPURIOUS_ALPHA")]
    result = triton_client.infer("tiny", [_bytes_input(images)], outputs=asked,
                                 parameters={"class_index": 0, "spufix": mode})
    assert [o.name for o in result.get_response().outputs] == ["TRIGGER", "SPUFIX_LOGITS", "SPURIOUS_ALPHA"]
    assert result.as_numpy("LOGITS") is None
    scores = client.score("tiny", images, class_index=0, spufix=mode)
    np.testing.assert_allclose(result.as_numpy("SPURIOUS_ALPHA"), [s.spurious_alpha for s in scores], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("TRIGGER"), [s.trigger for s in scores])
    np.testing.assert_allclose(result.as_numpy("SPUFIX_LOGITS")[:, 0], [s.spufix.logit for s in scores], rtol=1e-5)


def test_readme_example_runs(server: BackgroundServer, client: Client, tmp_path: Path, images: list[bytes]) -> None:
    """The README's tritonclient example, as written, against this server."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Calling spurguard from Triton clients.*?```python\n(.*?)```", readme, re.DOTALL)
    assert code is not None
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(image)
    first, rest = code.group(1).split("\n", 1)
    assert first.startswith("SERVER, MODEL, PATHS = ")
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(f"SERVER, MODEL, PATHS = {server.address!r}, 'tiny', {[str(p) for p in paths]!r}\n{rest}", {})
    scores = client.score("tiny", images[:3])
    lines = output.getvalue().splitlines()
    assert len(lines) == 3 and all(line.startswith(str(p)) for line, p in zip(lines, paths))
    assert [f"class {s.predictions[0].class_index}" in line for line, s in zip(lines, scores)] == [True] * 3


# ---- errors ----


def test_errors_have_their_status_codes(triton_client: triton.InferenceServerClient, images: list[bytes]) -> None:
    corrupt = _code(lambda: triton_client.infer("tiny", [_bytes_input([images[0], b"\x89PNG\r\n\x1a\nnot really"])]))
    assert corrupt[0] == "StatusCode.INVALID_ARGUMENT" and corrupt[1].startswith("image 1: ")
    assert _code(lambda: triton_client.infer("nope", [_bytes_input(images[:1])]))[0] == "StatusCode.NOT_FOUND"
    assert _code(lambda: triton_client.get_model_metadata("nope"))[0] == "StatusCode.NOT_FOUND"
    assert _code(lambda: triton_client.is_model_ready("tiny", "2"))[0] == "StatusCode.NOT_FOUND"
    floats = triton.InferInput("IMAGE", [1, 4], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 4), np.float32))
    wrong_type = _code(lambda: triton_client.infer("tiny", [floats]))
    assert wrong_type[0] == "StatusCode.INVALID_ARGUMENT" and "BYTES" in wrong_type[1] and "UINT8" in wrong_type[1]
    gray = _pixels_input(np.zeros((1, 8, 8), np.uint8))
    assert "[N, H, W, 3]" in _code(lambda: triton_client.infer("tiny", [gray]))[1]
    named_wrong = triton.InferInput("PIXELS", [1], "BYTES")
    named_wrong.set_data_from_numpy(np.array([images[0]], dtype=np.object_))
    assert _code(lambda: triton_client.infer("tiny", [named_wrong]))[0] == "StatusCode.INVALID_ARGUMENT"
    for bad in ({"class": 1}, {"class_index": 7}, {"spufix": "hard"}):
        code, message = _code(lambda: triton_client.infer("tiny", [_bytes_input(images[:1])], parameters=bad))
        assert code in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"), (bad, code, message)
    unknown = _code(lambda: triton_client.infer("tiny", [_bytes_input(images[:1])],
                                                outputs=[triton.InferRequestedOutput("PROBS")]))
    assert unknown[0] == "StatusCode.INVALID_ARGUMENT" and "LOGITS" in unknown[1]
    too_many = _code(lambda: triton_client.infer("tiny", [_bytes_input(images * 2)]))
    assert too_many[0] == "StatusCode.RESOURCE_EXHAUSTED"
    statistics = _code(lambda: triton_client.get_inference_statistics("tiny"))
    assert statistics[0] == "StatusCode.UNIMPLEMENTED" and "ModelInfer" in statistics[1]


@pytest.mark.parametrize("shape", [[0, 8, 8, 3], [1, 0, 8, 3], [0, 2**62, 2**62, 3], [1, 2**62, 0, 3]])
def test_uint8_pixels_of_no_size_are_invalid(shape: list[int]) -> None:
    """Huge dimensions beside a 0 were INTERNAL: numpy cannot make that empty array (the request fuzzer)."""
    request = oip.ModelInferRequest(inputs=[{"name": "IMAGE", "datatype": "UINT8", "shape": shape}],
                                    raw_input_contents=[b""])
    with pytest.raises(InvalidInput, match="no pixels"):
        read_images(request)


def test_a_loading_model_is_not_ready_and_unavailable(tmp_path: Path) -> None:
    module = GatedCNN()
    backend = _backend(module, "gated")
    module.gate.clear()  # warm-up waits here: the model stays loading

    async def check() -> None:
        server = SpurguardServer(ServerConfig(models=(), store=tmp_path, port=0, device="cpu"), backends=[backend])
        await server.start()
        try:
            client = triton_aio.InferenceServerClient(server.address)
            assert not await client.is_server_ready() and not await client.is_model_ready("gated")
            with pytest.raises(InferenceServerException) as caught:
                await client.infer("gated", [_bytes_input([b"x"])])
            assert caught.value.status() == "StatusCode.UNAVAILABLE" and "loading" in caught.value.message()
            module.gate.set()
            await asyncio.wait_for(server.wait_ready(), 20)
            assert await client.is_model_ready("gated")
            await client.close()
        finally:
            module.gate.set()
            await server.stop(0, drain_delay=0)

    asyncio.run(check())
