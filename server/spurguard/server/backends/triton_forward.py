"""The backbone's forward pass on a Triton Inference Server (model.toml [triton]), over gRPC.

A model directory always ships its backbone (model.toml requires it), so a Triton-served model
is a TorchBackend whose forward-only runtime is remote: the head, neural PCA, SpuFix and the
store stay here, the local module still answers gradient work (attacks, heatmaps) with the same
weights, and at load Triton's features are checked against the local ones like any runtime's.
Names, datatype and dims come from Triton's model metadata, never from model.toml.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from spurguard.server.backends.modeldir import TritonSpec
from spurguard.server.errors import InvalidInput, NotFound, Unavailable

log = logging.getLogger("spurguard.server")

CONNECT_TIMEOUT_S = 10.0  # how long a load waits for Triton (and the model) to come up
REQUEST_TIMEOUT_S = 60.0  # one ModelInfer: a hung server is an error, never a hang
HEALTH_TIMEOUT_S = 1.0  # one readiness check of the health follower
_RETRY_S = 0.25
# gRPC's reconnect backoff grows to 120 s by default: after an outage of a minute the channel
# would refuse requests long after Triton is back. Cap it so the next requests find it again.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_UNREACHABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}
T = TypeVar("T")


def _unavailable(error: InferenceServerException) -> bool:
    return error.status() in _UNREACHABLE


def _pem_files(spec: TritonSpec) -> dict[str, Path | None]:
    """The TLS files under tritonclient's names for them (read by the client; None: not given)."""
    return {"root_certificates": spec.root_certificates, "private_key": spec.private_key,
            "certificate_chain": spec.certificate_chain}


class TritonForward:
    """ModelInfer of one Triton model: float32 [N,3,S,S] in, float32 [N,d] out, a batch per request
    (split only where Triton's max_batch_size is smaller)."""

    runtime: Literal["triton"] = "triton"
    # Requests kept on their way to Triton at once: while one computes there, the next is on the
    # wire, and Triton's dynamic batcher and instances see enough work to stay busy.
    batches_in_flight = 4

    def __init__(
        self, spec: TritonSpec, *, input_size: int, feature_dim: int, connect_timeout_s: float = CONNECT_TIMEOUT_S
    ) -> None:
        """Wait (bounded) for Triton and the model to be ready, then check its one input and
        output against the model's input size and the head's d."""
        self.url = spec.url
        self.model = model = spec.model
        self.where = f"Triton model {model!r} at {spec.url}"
        self.client = triton.InferenceServerClient(
            spec.address,
            channel_args=_CHANNEL_ARGS,
            ssl=spec.tls,
            **{key: None if path is None else str(path) for key, path in _pem_files(spec).items()},
        )
        metadata = self._wait_ready(connect_timeout_s)
        config = self._call(lambda: self.client.get_model_config(model)).config
        self.batch_limit = int(config.max_batch_size)
        if len(metadata.inputs) != 1 or len(metadata.outputs) != 1:
            raise InvalidInput(
                f"{self.where} has {len(metadata.inputs)} inputs and {len(metadata.outputs)} outputs; "
                "a backbone has one of each (images [N,3,S,S] -> features [N,d])"
            )
        (tensor_in,), (tensor_out,) = metadata.inputs, metadata.outputs
        self.input_name, self.output_name = tensor_in.name, tensor_out.name
        self._check(tensor_in, [3, input_size, input_size], "input", "preprocess.size in model.toml")
        self._check(tensor_out, [feature_dim], "output", "the head's d")

    def _check(self, tensor: triton.service_pb2.ModelMetadataResponse.TensorMetadata, want: list[int],
               role: str, against: str) -> None:
        shape = list(tensor.shape)
        if tensor.datatype != "FP32":
            raise InvalidInput(f"{self.where}: {role} {tensor.name!r} is {tensor.datatype}, expected FP32")
        if not shape or shape[0] != -1:
            raise InvalidInput(f"{self.where}: {role} {tensor.name!r} {shape} has no variable batch dimension")
        if shape[1:] != want:
            raise InvalidInput(
                f"{self.where}: {role} {tensor.name!r} is {shape}, but {against} gives [-1, {', '.join(map(str, want))}]"
            )

    def ready(self) -> bool:
        """Whether Triton is up and has the model ready now (a quick check, for health)."""
        try:
            return bool(self.client.is_server_live(client_timeout=HEALTH_TIMEOUT_S)
                        and self.client.is_model_ready(self.model, client_timeout=HEALTH_TIMEOUT_S))
        except InferenceServerException:
            return False

    def _wait_ready(self, timeout_s: float) -> triton.service_pb2.ModelMetadataResponse:
        """Retry while Triton starts or loads the model; NOT_FOUND for a model it does not have."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client.is_server_live() and self.client.is_model_ready(self.model):
                    return self.client.get_model_metadata(self.model)
                problem = f"{self.where} is not ready"
                self.client.get_model_metadata(self.model)  # NOT_FOUND when Triton does not know it
            except InferenceServerException as error:
                if error.status() == "StatusCode.NOT_FOUND":
                    raise NotFound(f"{self.where}: {error.message()}") from None
                if not _unavailable(error):
                    raise InvalidInput(f"{self.where}: {error.message()}") from None
                problem = f"Triton at {self.url} is unreachable ({error.message()})"
            if time.monotonic() >= deadline:
                raise Unavailable(f"{problem} after {timeout_s:.0f} s")
            time.sleep(_RETRY_S)

    def _call(self, call: Callable[[], T]) -> T:
        """Triton's errors as ours (see `_error`)."""
        try:
            return call()
        except InferenceServerException as error:
            raise self._error(error) from None

    def _error(self, error: InferenceServerException) -> Exception:
        """UNAVAILABLE (naming the URL) while Triton is down, so callers retry; else its message."""
        if _unavailable(error):
            return Unavailable(f"Triton at {self.url} is unavailable: {error.message()}")
        return InvalidInput(f"{self.where}: {error.message()}")

    def _send(self, x: np.ndarray) -> Future[np.ndarray]:
        """One ModelInfer on its way; its features arrive in the returned future."""
        tensor = triton.InferInput(self.input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        output = triton.InferRequestedOutput(self.output_name)
        features: Future[np.ndarray] = Future()

        def arrived(result: triton.InferResult | None, error: InferenceServerException | None) -> None:
            if error is not None:
                features.set_exception(self._error(error))
            else:  # a writable copy of the response's buffer
                features.set_result(np.array(result.as_numpy(self.output_name)))

        self._call(lambda: self.client.async_infer(
            self.model, [tensor], arrived, outputs=[output], client_timeout=REQUEST_TIMEOUT_S
        ))
        return features

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """All chunks are sent before the first answer is awaited (Triton works on them together)."""
        step = self.batch_limit if self.batch_limit > 0 else x.shape[0]
        sent = [self._send(x[start : start + step]) for start in range(0, x.shape[0], step)]
        chunks = [features.result() for features in sent]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
