"""The thin spurguard client: one object per server, plain dataclasses out, grpcio underneath.

Why these choices:
- Only grpcio, protobuf and numpy are imported, so scoring from a web service or a notebook
  needs no torch; PIL images are accepted by duck typing without importing PIL.
- Unary calls get a default deadline; read-only ones (list/get models, components, labels,
  jobs, and Score) are retried on UNAVAILABLE with exponential backoff inside that deadline.
  Mutations and streams are never retried: a retried Fit could start a second job.
- A `token` travels as `authorization: Bearer TOKEN` metadata on every call, added by one
  channel interceptor so that no method can forget it; over plaintext it is readable on the
  way, so use TLS beyond loopback.
- Every failure the server (or the transport) reports is a `SpurguardClientError` carrying
  the gRPC status code; local misuse (a wrong argument type, an unreadable file) raises the
  usual TypeError / ValueError / OSError. A bad image inside a batch is neither: it comes back
  as that image's `ScoreResult.error`.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, Union

import grpc
import numpy as np

from spurguard import vocab as t
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc
from spurguard.wire import from_message, from_update, to_message

if TYPE_CHECKING:  # for the annotation only: PIL is never imported at run time
    from PIL.Image import Image as PILImage

MAX_MESSAGE_BYTES = 64 * 2**20  # the server's documented per-message limit, both directions
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 4
DEFAULT_SCORE_BATCH = 64
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 2.0
_ENVELOPE_BYTES = 2**20  # room left in a Score request for everything but the image bytes

# An image: a file path (str or PathLike), encoded file bytes, a uint8 numpy array (HxW or
# HxWxC, C in 1/3/4) or a PIL image. Paired with a string it carries its own id.
ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray, "PILImage"]
ImageItem = Union[ImageLike, tuple[str, ImageLike]]

_T = TypeVar("_T")
_M = TypeVar("_M")


class SpurguardClientError(Exception):
    """A call failed: `code` is the gRPC status, `details` the server's one-line message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> SpurguardClientError:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


def tls_credentials(
    ca: bytes | None = None, cert: bytes | None = None, key: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS for `Client(credentials=...)` from PEM bytes: `ca` verifies the server (None: the
    system's trusted roots); `cert` and `key` are this client's identity, for servers that
    require client certificates (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ValueError("give both a client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _check_token(token: str) -> str:
    """gRPC metadata values are printable ASCII: say so here rather than fail on the first call."""
    if not token or not all(" " < char <= "~" for char in token):
        raise ValueError("token must be non-empty printable ASCII without spaces")
    return token


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call, whatever its kind."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method, details.timeout, [*(details.metadata or ()), self._metadata],
            details.credentials, details.wait_for_ready, getattr(details, "compression", None),
        )

    def _intercept(self, continuation: Callable[[grpc.ClientCallDetails, Any], Any],
                   details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    intercept_unary_unary = intercept_unary_stream = _intercept
    intercept_stream_unary = intercept_stream_stream = _intercept


class Stream(Iterator[_T]):
    """A server stream's messages, converted as they arrive. `cancel()`, from any thread (a web
    app's event loop while a worker thread waits in `next`), ends the call: the iteration then
    stops as if the stream had ended. A consumer that stops early should `cancel()` or `close()`
    (or use it as a context manager); dropping it cancels the call too (grpc cancels on garbage
    collection)."""

    def __init__(self, call: Any, convert: Callable[[Any], _T]) -> None:
        self._call = call
        self._convert = convert
        self._cancelled = False

    def __iter__(self) -> Stream[_T]:
        return self

    def __next__(self) -> _T:
        try:
            message = next(self._call)
        except grpc.RpcError as error:
            if self._cancelled:
                raise StopIteration from None
            raise SpurguardClientError.from_rpc_error(error) from None
        return self._convert(message)

    def cancel(self) -> None:
        """End the call now (a no-op once it has ended)."""
        self._cancelled = True
        self._call.cancel()

    close = cancel

    def __enter__(self) -> Stream[_T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class Client:
    """A connection to one spurguard server; use as a context manager to close the channel.

    `timeout` is the deadline (seconds) of each unary call, retries included; None: no deadline.
    `stream_timeout` is that of streaming calls (fit, visualize, score_stream, evaluate), which
    may legitimately run for hours, hence no deadline by default. `retries` is how many times
    a read-only call is retried on UNAVAILABLE. `token` is sent with every call, for servers
    started with `--auth-tokens`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        stream_timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        interceptors = [] if token is None else [_BearerToken(_check_token(token))]
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if credentials is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            channel = grpc.secure_channel(target, credentials, options=options)
        self._channel = grpc.intercept_channel(channel, *interceptors)
        self._stub = pb_grpc.SpurguardStub(self._channel)
        self.target = target
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retries = retries

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- call machinery ----

    def _unary(self, method: Callable[..., _M], request: Any, *, idempotent: bool) -> _M:
        """One unary call under the client deadline; idempotent ones retried on UNAVAILABLE."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        attempt = 0
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return method(request, timeout=remaining)
            except grpc.RpcError as error:
                delay = min(_BACKOFF_FIRST_S * 2**attempt, _BACKOFF_MAX_S) * random.uniform(0.5, 1.0)
                retry = (
                    idempotent
                    and attempt < self.retries
                    and isinstance(error, grpc.Call)
                    and error.code() == grpc.StatusCode.UNAVAILABLE
                    and (deadline is None or time.monotonic() + delay < deadline)
                )
                if not retry:
                    raise SpurguardClientError.from_rpc_error(error) from None
            time.sleep(delay)
            attempt += 1

    @staticmethod
    def _stream(call: Any, convert: Callable[[_M], _T]) -> Stream[_T]:
        return Stream(call, convert)

    # ---- models ----

    def list_models(self) -> list[t.ModelInfo]:
        """Every loaded model (without class names)."""
        response = self._unary(self._stub.ListModels, pb.ListModelsRequest(), idempotent=True)
        return [from_message(m, t.ModelInfo) for m in response.models]

    def get_model(self, model: str) -> t.ModelInfo:
        """One model, with its class names and fit state."""
        info = self._unary(self._stub.GetModel, pb.GetModelRequest(model=model), idempotent=True)
        return from_message(info, t.ModelInfo)

    # ---- fit jobs ----

    def fit(
        self,
        model: str,
        dataset: str,
        *,
        classes: Iterable[int] = (),
        num_components: int | None = None,
        batch_size: int | None = None,
        job_id: str | None = None,
        extend: bool = False,
    ) -> Stream[t.FitUpdate]:
        """Start a fit job on the server's `dataset` folder: yields FitProgress, then FitSummary.

        The job keeps running if the iteration stops; follow it again with `watch_job`.
        """
        request = to_message(t.FitRequest(model, dataset, tuple(classes), num_components, batch_size, job_id, extend))
        return self._stream(self._stub.Fit(request, timeout=self.stream_timeout), _fit_update)

    def watch_job(self, job_id: str) -> Stream[t.FitUpdate]:
        """Re-attach to a job: latest progress, live updates, then the summary (a TransferSummary
        for a transfer job)."""
        call = self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=self.stream_timeout)
        return self._stream(call, _fit_update)

    def get_job(self, job_id: str) -> t.Job:
        job = self._unary(self._stub.GetJob, pb.GetJobRequest(job_id=job_id), idempotent=True)
        return from_message(job, t.Job)

    def list_jobs(self, model: str | None = None) -> list[t.Job]:
        """Running and recently finished jobs, newest first."""
        response = self._unary(self._stub.ListJobs, pb.ListJobsRequest(model=model), idempotent=True)
        return [from_message(j, t.Job) for j in response.jobs]

    def cancel_job(self, job_id: str) -> t.Job:
        job = self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id), idempotent=False)
        return from_message(job, t.Job)

    # ---- components and labels ----

    def get_components(
        self,
        model: str,
        class_index: int,
        *,
        top: int | None = None,
        include_vectors: bool = False,
        fit_id: str | None = None,
    ) -> t.Components:
        """One class's components (the first `top`, or all), with vectors only if asked."""
        request = to_message(t.GetComponentsRequest(model, class_index, top, include_vectors, fit_id))
        return from_message(self._unary(self._stub.GetComponents, request, idempotent=True), t.Components)

    def label(
        self,
        model: str,
        class_index: int,
        component: int,
        label: t.LabelName,
        *,
        note: str = "",
        fit_id: str | None = None,
    ) -> t.LabelRecord:
        """Label a component "spurious", "not_spurious", "inconsistent" or "unlabeled" (clears)."""
        request = to_message(t.LabelRequest(model, class_index, component, label, note, fit_id))
        return from_message(self._unary(self._stub.Label, request, idempotent=False), t.LabelRecord)

    def list_labels(
        self,
        model: str,
        *,
        class_index: int | None = None,
        label: t.LabelName | None = None,
        fit_id: str | None = None,
        component: int | None = None,
    ) -> list[t.LabelRecord]:
        """Labels of a fit; `label="unlabeled"` lists the components nobody labelled yet;
        `component` (with `class_index`) only that one."""
        return list(self._label_list(t.ListLabelsRequest(model, class_index, label, fit_id, component)).labels)

    def label_history(
        self,
        model: str,
        *,
        class_index: int | None = None,
        component: int | None = None,
        fit_id: str | None = None,
    ) -> list[t.LabelRecord]:
        """Every label write of a fit (the current one by default), oldest first, each with its
        author and time: another labeller's earlier note, a cleared label ("unlabeled") too."""
        request = t.ListLabelsRequest(model, class_index, None, fit_id, component, history=True)
        return list(self._label_list(request).history)

    def watch_labels(
        self,
        model: str,
        *,
        class_index: int | None = None,
        component: int | None = None,
        history: bool = False,
        fit_id: str | None = None,
    ) -> Stream[t.LabelList]:
        """The labels (and with `history`, every write) of a fit now, then again each time they
        change, whoever changes them, until `cancel()`; the stream ends by itself when the server
        stops answering (a drain): watch again, maybe through another replica.

            with client.watch_labels("demo", class_index=3) as snapshots:
                for snapshot in snapshots:
                    show(snapshot.labels)
        """
        request = to_message(t.ListLabelsRequest(model, class_index, None, fit_id, component, history))
        call = self._stub.WatchLabels(request, timeout=self.stream_timeout)
        return self._stream(call, lambda response: from_message(response, t.LabelList))

    def _label_list(self, request: t.ListLabelsRequest) -> t.LabelList:
        response = self._unary(self._stub.ListLabels, to_message(request), idempotent=True)
        return from_message(response, t.LabelList)

    # ---- visualize ----

    def visualize(
        self,
        model: str,
        class_index: int,
        components: Iterable[int],
        *,
        steps: int | None = None,
        eps: float | None = None,
        frame_every: int | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        heatmap: t.HeatmapMethodName | None = None,
        heatmap_layer: str | None = None,
        fit_id: str | None = None,
        parameterization: t.AttackParameterizationName | None = None,
    ) -> Stream[t.VisualizeUpdate]:
        """Top images, heatmaps, attack frames and the final attack image, as they are made.

        `heatmap`: "grad_cam" (integrated gradients where the model's layers cannot be hooked),
        "integrated_gradients", "input_gradient", "none", or None for the server default.
        `heatmap_layer`: the feature map Grad-CAM uses (a submodule name); None: the last spatial one.
        `parameterization`: how the attack moves the image, "pixel", "low_frequency" or "jitter"
        (None: the server's default, pixel); each AttackResult says which one ran.
        """
        request = to_message(t.VisualizeRequest(
            model, class_index, tuple(components), steps, eps, frame_every, top_k, seed, heatmap, fit_id, heatmap_layer,
            parameterization,
        ))
        call = self._stub.Visualize(request, timeout=self.stream_timeout)
        return self._stream(call, lambda update: from_update(update, t.VisualizeUpdate))

    # ---- score ----

    def score(
        self,
        model: str,
        images: Iterable[ImageItem],
        *,
        class_index: int | None = None,
        top: int | None = None,
        spufix: t.SpufixModeName | None = None,
        batch_size: int = DEFAULT_SCORE_BATCH,
    ) -> list[t.ScoreResult]:
        """Score images (any number): sent `batch_size` at a time within the message limit.

        Results come in input order. An image that cannot be scored (undecodable, or alone over
        the message limit) gets a result with `error` set; the others are unaffected.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        options = to_message(t.ScoreOptions(class_index, top, spufix))
        budget = MAX_MESSAGE_BYTES - _ENVELOPE_BYTES
        results: list[t.ScoreResult] = []
        pending: list[pb.Image | t.ScoreResult] = []  # in input order; results stand for local failures
        sent_count = pending_bytes = 0

        def flush() -> None:
            nonlocal sent_count, pending_bytes
            sent = [slot for slot in pending if isinstance(slot, pb.Image)]
            replies: Iterator[t.ScoreResult] = iter(())
            if sent:
                request = pb.ScoreRequest(model=model, images=sent, options=options)
                response = self._unary(self._stub.Score, request, idempotent=True)
                if len(response.results) != len(sent):
                    raise SpurguardClientError(
                        grpc.StatusCode.INTERNAL,
                        f"server returned {len(response.results)} results for {len(sent)} images",
                    )
                replies = (from_message(r, t.ScoreResult) for r in response.results)
            results.extend(slot if isinstance(slot, t.ScoreResult) else next(replies) for slot in pending)
            pending.clear()
            sent_count = pending_bytes = 0

        for index, item in enumerate(images):
            image = _image(item, str(index))
            size = image.ByteSize()
            if size > budget:
                pending.append(_too_large(image.id, size, budget))
                continue
            if sent_count == batch_size or pending_bytes + size > budget:
                flush()
            pending.append(image)
            sent_count += 1
            pending_bytes += size
        flush()
        return results

    def score_stream(
        self,
        model: str,
        images: Iterable[ImageItem],
        *,
        class_index: int | None = None,
        top: int | None = None,
        spufix: t.SpufixModeName | None = None,
    ) -> Iterator[t.ScoreResult]:
        """Score a (possibly endless) iterable over one bidirectional stream; results in input order.

        Images are read lazily as the stream has room, so memory stays bounded by what is in flight.
        """
        options = to_message(t.ScoreOptions(class_index, top, spufix))
        local_failure: list[BaseException] = []

        def requests() -> Iterator[pb.ScoreStreamRequest]:
            try:
                for index, item in enumerate(images):
                    yield pb.ScoreStreamRequest(
                        request_id=str(index), model=model, image=_image(item, str(index)), options=options
                    )
            except Exception as exc:  # grpc would swallow it into CANCELLED: keep it for the caller
                local_failure.append(exc)
                raise

        call = self._stub.ScoreStream(requests(), timeout=self.stream_timeout)
        replies = self._stream(call, lambda r: (int(r.request_id), from_message(r.result, t.ScoreResult)))
        return _in_order(replies, local_failure)

    # ---- transfer ----

    def transfer(
        self,
        source_model: str,
        target_model: str,
        *,
        classes: Iterable[int] = (),
        batch_size: int | None = None,
        job_id: str | None = None,
    ) -> Stream[t.TransferUpdate]:
        """Carry the source's spurious labels (its current fit) to the target (SPEC §1 transfer):
        yields FitProgress, then TransferSummary; from then on the target's Score, Evaluate and
        SpuFix apply the directions. A job like `fit`: it keeps running if the iteration stops.

            *_, summary = client.transfer("robust", "standard")
        """
        request = to_message(t.TransferRequest(source_model, target_model, tuple(classes), batch_size, job_id))
        call = self._stub.Transfer(request, timeout=self.stream_timeout)
        return self._stream(call, lambda update: from_update(update, t.TransferUpdate))

    # ---- evaluate ----

    def evaluate(
        self,
        model: str,
        clean: str,
        spurious: str,
        *,
        spufix: t.SpufixModeName | None = None,
        classes: Iterable[int] = (),
        batch_size: int | None = None,
        directions: t.SpuriousDirectionsName | None = None,
    ) -> Stream[t.EvaluateUpdate]:
        """The spurious score benchmark on server-side folders: EvaluateProgress, then EvaluateResult.

        `directions`: which spurious directions SpuFix removes: "own" (the model's labels),
        "transferred" (the transfer in use) or "both" (None: both, what Score applies)."""
        request = to_message(t.EvaluateRequest(model, clean, spurious, spufix, tuple(classes), batch_size, directions))
        call = self._stub.Evaluate(request, timeout=self.stream_timeout)
        return self._stream(call, lambda update: from_update(update, t.EvaluateUpdate))


# ---- stream ordering ----


def _in_order(replies: Iterator[tuple[int, _T]], local_failure: list[BaseException]) -> Iterator[_T]:
    """Yield replies by request number, holding early ones back until the gap before them fills."""
    held: dict[int, _T] = {}
    expected = 0
    try:
        for number, result in replies:
            held[number] = result
            while expected in held:
                yield held.pop(expected)
                expected += 1
    except SpurguardClientError:
        if local_failure:
            raise local_failure[0] from None
        raise
    finally:
        replies.close()  # type: ignore[attr-defined]  # a consumer that stops early ends the call now
    if local_failure:
        raise local_failure[0]
    if held:
        raise SpurguardClientError(
            grpc.StatusCode.INTERNAL, f"stream ended without a reply to request {expected}"
        )


# ---- images ----


def _is_pil_image(value: object) -> bool:
    """A PIL image, recognised by its class's module so that PIL never has to be imported here."""
    return type(value).__module__.split(".")[0] == "PIL" and hasattr(value, "mode") and hasattr(value, "convert")


def _raw(array: np.ndarray) -> pb.RawImage:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {array.dtype}; scale and cast first")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image arrays must be HxW or HxWxC with C in 1, 3, 4; got shape {array.shape}")
    height, width, channels = array.shape
    return pb.RawImage(
        data=np.ascontiguousarray(array).tobytes(), height=height, width=width, channels=channels
    )


def _image(item: ImageItem, default_id: str) -> pb.Image:
    """One input as an Image message; a path's id is the path, others get `default_id`."""
    if isinstance(item, tuple):
        if len(item) != 2 or not isinstance(item[0], str):
            raise TypeError("an (id, image) pair must be a 2-tuple whose first item is a string")
        image_id, image = item
    else:
        image_id, image = None, item
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        with open(path, "rb") as file:
            return pb.Image(id=path if image_id is None else image_id, encoded=file.read())
    image_id = default_id if image_id is None else image_id
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(id=image_id, encoded=bytes(image))
    if isinstance(image, np.ndarray):
        return pb.Image(id=image_id, raw=_raw(image))
    if _is_pil_image(image):
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGB")
        return pb.Image(id=image_id, raw=_raw(np.asarray(image)))
    raise TypeError(
        f"unsupported image type {type(image).__name__}: use a path, encoded bytes, "
        "a uint8 numpy array or a PIL image"
    )


def _too_large(image_id: str, size: int, budget: int) -> t.ScoreResult:
    message = f"image is {size} bytes encoded, over the {budget}-byte request budget; downscale it"
    return t.ScoreResult.failed(image_id, grpc.StatusCode.RESOURCE_EXHAUSTED.name, message)


def _fit_update(update: pb.FitUpdate) -> t.FitUpdate:
    return from_update(update, t.FitUpdate)  # type: ignore[no-any-return]


