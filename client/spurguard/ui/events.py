"""Server-sent event streams of `spurguard ui`: a component's Visualize as it is made, and a
class's labels as other people change them.

Why these shapes:
- The client is synchronous, so each gRPC stream is read by a thread of its own that hands
  messages to the event loop; when the browser goes away (the page is left, the tab closed) the
  response's generator is closed, and its `finally` cancels the gRPC call: a feature attack
  nobody watches does not keep a server's heavy-call slot.
- Live labels follow WatchLabels, which the server pushes on every change (its own writes and,
  through the database replicas share, the others'), and each message is a whole snapshot (not
  a diff), so the page just re-renders it and cannot drift. A watch that ends (a draining
  server) is opened again; a server without WatchLabels is polled with ListLabels instead.
- Errors are events too: the page says what went wrong in words. A Visualize error ends its
  stream; a label-watch error is sent once and the watch is retried, so the view recovers by
  itself when the server does.
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from spurguard import vocab as t
from spurguard.client import SpurguardClientError, Stream
from spurguard.ui.gateway import Problem

KEEPALIVE_S = 10.0  # a comment line this often keeps proxies from closing a quiet stream


def event(name: str, data: Any) -> str:
    """One server-sent event: `event: NAME` and its JSON data."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def visualize_event(update: t.VisualizeUpdate) -> str:
    """A Visualize message as the page's event: the same fields, its PNG as a data URL."""
    if isinstance(update, t.TopImage):
        return event("top_image", {"rank": update.rank, "image_id": update.image_id, "alpha": update.alpha,
                                   "png": _png(update.png)})
    if isinstance(update, t.Heatmap):
        return event("heatmap", {"rank": update.rank, "method": update.method, "png": _png(update.png)})
    if isinstance(update, t.AttackFrame):
        return event("frame", {"step": update.step, "alpha": update.alpha, "prob": update.prob,
                               "png": _png(update.png)})
    return event("result", {"start_alpha": update.start_alpha, "final_alpha": update.final_alpha,
                            "final_prob": update.final_prob, "steps": update.steps, "eps": update.eps,
                            "parameterization": update.parameterization, "png": _png(update.png)})


KEEPALIVE = ": keep-alive\n\n"
_T = TypeVar("_T")


async def _messages(stream: Stream[_T], server: str, keepalive_s: float) -> AsyncIterator[_T | None]:
    """A gRPC stream's messages on the event loop, read by a thread of its own (`next` blocks
    until the server sends), with None after every `keepalive_s` of quiet; a failed call raises
    a Problem. Closing this generator cancels the call."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def pump() -> None:
        try:
            for message in stream:
                loop.call_soon_threadsafe(queue.put_nowait, ("message", message))
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
        except SpurguardClientError as error:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", Problem.of(error, server)))
        except RuntimeError:  # the loop closed first (the ui is stopping): nobody is listening
            pass

    threading.Thread(target=pump, name="spurguard-ui-stream", daemon=True).start()
    try:
        while True:
            try:
                kind, item = await asyncio.wait_for(queue.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield None
                continue
            if kind == "error":
                raise item
            if kind == "end":
                return
            yield item
    finally:
        stream.cancel()


async def relay(open_stream: Callable[[], Stream[t.VisualizeUpdate]], server: str) -> AsyncIterator[str]:
    """The events of one Visualize call, then `end` (or `error` with words); closing this
    generator early cancels the call."""
    try:
        async for update in _messages(open_stream(), server, KEEPALIVE_S):
            yield KEEPALIVE if update is None else visualize_event(update)
    except Problem as problem:
        yield event("error", problem.to_dict())
        return
    yield event("end", {})


class _Changes:
    """What a page was last sent, so that only news is sent again."""

    def __init__(self) -> None:
        self.last: str | None = None

    def news(self, name: str, data: Any) -> str | None:
        message = event(name, data)
        if message == self.last:
            return None
        self.last = message
        return message


async def label_watch(
    open_watch: Callable[[], Stream[Any]],
    convert: Callable[[Any], dict[str, Any]],
    read_snapshot: Callable[[], dict[str, Any]],
    server: str,
    poll_s: float,
    *,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[str]:
    """`labels` events with a class's snapshot (`convert`ed), at once and on every change the
    server's WatchLabels pushes. A watch that ends (the server drains) or fails is opened again
    after `poll_s` (an `error` event says why, once per distinct problem); against a server
    without WatchLabels (UNIMPLEMENTED) the snapshot is read every `poll_s` instead."""
    sent = _Changes()
    while True:
        try:
            async for snapshot in _messages(open_watch(), server, keepalive_s):
                message = KEEPALIVE if snapshot is None else sent.news("labels", convert(snapshot))
                if message is not None:
                    yield message
        except Problem as problem:
            if problem.code == "UNIMPLEMENTED":
                async for message in label_poll(read_snapshot, poll_s, sent, keepalive_s=keepalive_s):
                    yield message
                return
            message = sent.news("error", problem.to_dict())
            if message is not None:
                yield message
        await asyncio.sleep(poll_s)


async def label_poll(
    read_snapshot: Callable[[], dict[str, Any]], poll_s: float, sent: _Changes | None = None, *,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[str]:
    """`labels` events with a class's snapshot, at once and after every change seen by polling;
    an `error` event (once per distinct problem) while reading fails."""
    sent = sent or _Changes()
    quiet_s = 0.0
    while True:
        try:
            message = sent.news("labels", await run_in_threadpool(read_snapshot))
        except Problem as problem:
            message = sent.news("error", problem.to_dict())
        if message is not None:
            yield message
            quiet_s = 0.0
        elif quiet_s >= keepalive_s:
            yield KEEPALIVE
            quiet_s = 0.0
        await asyncio.sleep(poll_s)
        quiet_s += poll_s
