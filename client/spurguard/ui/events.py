"""Server-sent event streams of `spurguard ui`: a component's Visualize as it is made, and a
class's labels as other people change them.

Why these shapes:
- The client is synchronous, so each gRPC stream is read by a thread of its own that hands
  messages to the event loop; when the browser goes away (the page is left, the tab closed) the
  response's generator is closed, and its `finally` cancels the gRPC call: a feature attack
  nobody watches does not keep a server's heavy-call slot.
- Live labels poll ListLabels (with history) every `poll_s` and send a snapshot only when it
  changed. Polling works the same against one server or replicas behind a balancer, whatever
  database they share, and a snapshot (not a diff) cannot drift: the page just re-renders it.
- Errors are events too: the page says what went wrong in words. A Visualize error ends its
  stream; a label-poll error is sent once and polling goes on, so the view recovers by itself
  when the server does.
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

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


async def relay(open_stream: Callable[[], Stream[t.VisualizeUpdate]], server: str) -> AsyncIterator[str]:
    """The events of one Visualize call, then `end` (or `error` with words); closing this
    generator early cancels the call."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stream = open_stream()

    def pump() -> None:  # on its own thread: `next` blocks until the server sends
        try:
            for update in stream:
                loop.call_soon_threadsafe(queue.put_nowait, ("update", update))
            loop.call_soon_threadsafe(queue.put_nowait, ("end", None))
        except SpurguardClientError as error:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", Problem.of(error, server)))
        except RuntimeError:  # the loop closed first (the ui is stopping): nobody is listening
            pass

    threading.Thread(target=pump, name="spurguard-ui-visualize", daemon=True).start()
    try:
        while True:
            try:
                kind, item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if kind == "update":
                yield visualize_event(item)
            elif kind == "error":
                yield event("error", item.to_dict())
                return
            else:
                yield event("end", {})
                return
    finally:
        stream.cancel()


async def label_watch(
    read_snapshot: Callable[[], dict[str, Any]], poll_s: float, *, keepalive_s: float = KEEPALIVE_S
) -> AsyncIterator[str]:
    """`labels` events with a class's snapshot, at once and after every change seen by polling;
    an `error` event (once per distinct problem) while reading fails."""
    last: str | None = None
    quiet_s = 0.0
    while True:
        try:
            name, data = "labels", await run_in_threadpool(read_snapshot)
        except Problem as problem:
            name, data = "error", problem.to_dict()
        message = event(name, data)
        if message != last:
            yield message
            last, quiet_s = message, 0.0
        elif quiet_s >= keepalive_s:
            yield ": keep-alive\n\n"
            quiet_s = 0.0
        await asyncio.sleep(poll_s)
        quiet_s += poll_s
