"""What every servicer method gets, for both services on the port (spurguard.v1 and the Open
Inference Protocol): a failure leaves as its status (a typed error keeps its code, anything
unexpected is INTERNAL without a traceback on the wire), and every call is counted and timed."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import grpc

from spurguard.server.rpc.status import status_of


class ObservedServicer(Protocol):
    def observe(self, rpc: str, request: object, code: grpc.StatusCode, started: float) -> None:
        """Record one finished call (request metrics)."""
        ...


_S = TypeVar("_S", bound=ObservedServicer)
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@contextlib.asynccontextmanager
async def _outcome(
    servicer: ObservedServicer, name: str, request: object, context: grpc.aio.ServicerContext
) -> AsyncIterator[None]:
    """Around one call: any failure leaves as its status (never a traceback), and every call,
    failed, cancelled or not, is counted and timed."""
    started, code = time.monotonic(), grpc.StatusCode.OK
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as error:  # noqa: BLE001 - every failure leaves as a status, never a traceback
        status = status_of(error, name)
        code = status.code
        await context.abort(status.code, status.message)
    finally:
        servicer.observe(name, request, code, started)


def unary_call(
    method: Callable[[_S, _Request, grpc.aio.ServicerContext], Awaitable[_Response]],
) -> Callable[[_S, _Request, grpc.aio.ServicerContext], Awaitable[_Response]]:
    """A handler that returns one reply."""

    @functools.wraps(method)
    async def handler(self: _S, request: _Request, context: grpc.aio.ServicerContext) -> _Response:
        async with _outcome(self, method.__name__, request, context):
            return await method(self, request, context)
        raise AssertionError("unreachable: _outcome re-raises or aborts")

    return handler


def stream_call(
    method: Callable[[_S, _Request, grpc.aio.ServicerContext], AsyncIterator[_Response]],
) -> Callable[[_S, _Request, grpc.aio.ServicerContext], AsyncIterator[_Response]]:
    """A handler that streams its replies (an async generator)."""

    @functools.wraps(method)
    async def handler(self: _S, request: _Request, context: grpc.aio.ServicerContext) -> AsyncIterator[_Response]:
        async with _outcome(self, method.__name__, request, context):
            async with contextlib.aclosing(method(self, request, context)) as responses:
                async for response in responses:
                    yield response

    return handler
