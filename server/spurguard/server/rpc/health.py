"""grpc.health.v1 with Triton's live / ready split (SPEC §3).

`liveness` is SERVING while the process runs and can answer calls (a livenessProbe: failing it
restarts the pod); every other name is readiness (`""`, `spurguard.v1.Spurguard`, one per
model), NOT_SERVING until ready. On shutdown, `drain` turns readiness NOT_SERVING for good while
liveness stays SERVING (calls are still answered during the drain delay), and `close` turns
everything NOT_SERVING and ends the Watch streams.

Why not grpc_health's servicer: its graceful shutdown turns every name NOT_SERVING at once,
liveness included, and its Watch streams never end, so a draining server waited out its whole
grace period for every open Watch (a client doing client-side health checking holds one).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spurguard.server.errors import InvalidInput

LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):
    """The health of each name, told to Check and Watch; changed only on the event loop."""

    def __init__(self, readiness: Iterable[str]) -> None:
        names = list(readiness)
        if LIVENESS in names:
            raise InvalidInput(f"a model may not be named {LIVENESS!r}: that health name is the server's liveness")
        self._status = dict.fromkeys(names, NOT_SERVING) | {LIVENESS: SERVING}
        self._changed = asyncio.Event()  # set, and replaced, on every change
        self._draining = False
        self._closed = False

    def _update(self, statuses: dict[str, int]) -> None:
        self._status |= statuses
        self._changed.set()
        self._changed = asyncio.Event()

    def set_ready(self, name: str, ready: bool) -> None:
        """A readiness name's status; ignored once draining (nothing turns ready again)."""
        if not self._draining:
            self._update({name: SERVING if ready else NOT_SERVING})

    def drain(self) -> None:
        """Readiness NOT_SERVING for good (load balancers stop routing here); liveness stays SERVING."""
        self._draining = True
        self._update({name: NOT_SERVING for name in self._status if name != LIVENESS})

    def close(self) -> None:
        """Every name NOT_SERVING; each Watch stream sends that and ends, so it holds no drain up."""
        self.drain()
        self._closed = True
        self._update({LIVENESS: NOT_SERVING})

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no health status for service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (SERVICE_UNKNOWN for a name not known yet), until closed."""
        sent = None
        while True:
            changed = self._changed  # taken before sending: a change while sending is not missed
            status = self._status.get(request.service, UNKNOWN)
            if status != sent:
                yield health_pb2.HealthCheckResponse(status=status)
                sent = status
            if self._closed:
                return
            await changed.wait()
