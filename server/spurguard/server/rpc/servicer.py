"""spurguard.v1.Spurguard over grpc.aio: messages in, the data plane, messages out.

Each RPC converts its request with spurguard.wire, calls the data plane (serving.dataplane) and
converts the result back; nothing else happens here but what only gRPC has: a decorator
(rpc.handlers) gives every handler its status mapping and request metrics, ScoreStream's flow
control, and who is calling (rpc.auth's `caller()`), which Label passes on as the author.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from spurguard import vocab
from spurguard.server.errors import InvalidInput
from spurguard.server.rpc.auth import caller
from spurguard.server.rpc.handlers import stream_call, unary_call
from spurguard.server.serving.dataplane import DataPlane, image_result
from spurguard.server.serving.decoding import Tenant
from spurguard.server.serving.metrics import Metrics
from spurguard.server.serving.models import ImageSource
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc
from spurguard.wire import from_message, to_message, to_update

STREAM_WINDOW = 256  # ScoreStream messages of one stream in flight before its reading pauses

_T = TypeVar("_T")


# ---- messages in ----


def read(message: Message, cls: type[_T]) -> _T:
    """A request message as its vocabulary type; a value the vocabulary has no name for (an
    enum number from a newer client, say) is INVALID_ARGUMENT."""
    try:
        return from_message(message, cls)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def image_source(image: pb.Image) -> ImageSource:
    """An Image message as backend input: encoded bytes or an HxWxC array (or why it is neither)."""
    kind = image.WhichOneof("data")
    if kind == "encoded":
        return image.encoded
    if kind != "raw":
        return InvalidInput("image has no data: set `encoded` (file bytes) or `raw` (pixels)")
    raw = image.raw
    if raw.channels not in (1, 3, 4):
        return InvalidInput(f"raw image has {raw.channels} channels; use 1, 3 or 4")
    expected = raw.height * raw.width * raw.channels
    if len(raw.data) != expected:
        return InvalidInput(
            f"raw image data is {len(raw.data)} bytes; {raw.height}x{raw.width}x{raw.channels} needs {expected}"
        )
    array = np.frombuffer(raw.data, np.uint8).reshape(raw.height, raw.width, raw.channels)
    return array[:, :, 0] if raw.channels == 1 else array


class SpurguardServicer(pb_grpc.SpurguardServicer):
    """The service: each RPC is the data plane's operation of the same name."""

    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane = plane
        self.metrics = metrics

    def observe(self, rpc: str, request: object, code: grpc.StatusCode, started: float) -> None:
        """Request metrics; the model label only ever names a served model."""
        model = getattr(request, "model", "")
        label = model if isinstance(model, str) and model in self.plane.models else ""
        self.metrics.observe_request(rpc, label, code.name, time.monotonic() - started)

    # ---- models ----

    @unary_call
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[to_message(m) for m in self.plane.list_models()])

    @unary_call
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return to_message(self.plane.get_model(request.model))

    # ---- fit jobs ----

    @stream_call
    async def Fit(self, request: pb.FitRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.FitUpdate]:
        async for update in self.plane.fit(read(request, vocab.FitRequest)):
            yield to_update(update, pb.FitUpdate)

    @stream_call
    async def WatchJob(self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.FitUpdate]:
        async for update in self.plane.watch_job(request.job_id):
            yield to_update(update, pb.FitUpdate)

    @unary_call
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return to_message(await self.plane.get_job(request.job_id))

    @unary_call
    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        model = request.model if request.HasField("model") else None
        return pb.ListJobsResponse(jobs=[to_message(job) for job in await self.plane.list_jobs(model)])

    @unary_call
    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return to_message(await self.plane.cancel_job(request.job_id))

    # ---- components and labels ----

    @unary_call
    async def GetComponents(
        self, request: pb.GetComponentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetComponentsResponse:
        return to_message(await self.plane.components(read(request, vocab.GetComponentsRequest)))

    @unary_call
    async def Label(self, request: pb.LabelRequest, context: grpc.aio.ServicerContext) -> pb.LabelRecord:
        return to_message(await self.plane.label(read(request, vocab.LabelRequest), author=caller()))

    @unary_call
    async def ListLabels(self, request: pb.ListLabelsRequest, context: grpc.aio.ServicerContext) -> pb.ListLabelsResponse:
        return to_message(await self.plane.list_labels(read(request, vocab.ListLabelsRequest)))

    @stream_call
    async def WatchLabels(
        self, request: pb.ListLabelsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListLabelsResponse]:
        async with contextlib.aclosing(self.plane.watch_labels(read(request, vocab.ListLabelsRequest))) as snapshots:
            async for snapshot in snapshots:
                yield to_message(snapshot)

    # ---- visualize ----

    @stream_call
    async def Visualize(
        self, request: pb.VisualizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.VisualizeUpdate]:
        async with contextlib.aclosing(self.plane.visualize(read(request, vocab.VisualizeRequest))) as updates:
            async for update in updates:
                yield to_update(update, pb.VisualizeUpdate)

    # ---- score ----

    @unary_call
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        images = [(image.id, image_source(image)) for image in request.images]
        results = await self.plane.score(request.model, images, read(request.options, vocab.ScoreOptions))
        return pb.ScoreResponse(results=[to_message(r) for r in results])

    @stream_call
    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        replies: asyncio.Queue[pb.ScoreStreamResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)  # messages read but not yet answered on the wire
        tenant = Tenant()  # the stream's messages share one fair share of the decode pool

        async def answer(message: pb.ScoreStreamRequest) -> None:
            replies.put_nowait(await self._stream_reply(message, tenant))

        async def read_requests() -> None:
            pending: set[asyncio.Task[None]] = set()
            try:
                async for message in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(answer(message))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*pending)
            except BaseException:
                for task in pending:
                    task.cancel()
                raise
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
                window.release()  # a client that stops reading replies stops its own reading too
            await reader  # a broken request stream fails the call
        finally:
            reader.cancel()

    async def _stream_reply(self, message: pb.ScoreStreamRequest, tenant: Tenant) -> pb.ScoreStreamResponse:
        """One stream message's reply; anything wrong with it, its options too, is its error."""
        image_id = message.image.id
        try:
            options = read(message.options, vocab.ScoreOptions)
        except InvalidInput as error:
            result = image_result(image_id, error, "ScoreStream")
        else:
            result = await self.plane.score_one(message.model, image_id, image_source(message.image), options, tenant)
        return pb.ScoreStreamResponse(request_id=message.request_id, result=to_message(result))

    # ---- transfer ----

    @stream_call
    async def Transfer(self, request: pb.TransferRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TransferUpdate]:
        async for update in self.plane.transfer(read(request, vocab.TransferRequest)):
            yield to_update(update, pb.TransferUpdate)

    # ---- evaluate ----

    @stream_call
    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateUpdate]:
        async with contextlib.aclosing(self.plane.evaluate(read(request, vocab.EvaluateRequest))) as updates:
            async for update in updates:
                yield to_update(update, pb.EvaluateUpdate)
