"""`spurguard ui`: the labelling page, a Starlette app served by uvicorn.

Pages (server-rendered, Jinja2, autoescaped): models -> a model's classes with labelling
progress -> a class page, one row per component, which its script (static/class.js) brings to
life: Visualize streamed per component, labels set with buttons or keys, other labellers'
changes shown as they happen. Everything the app knows comes from spurguard over gRPC with the
token it was started with (gateway.py); it stores nothing.

Why it is safe to run on a laptop next to a browser: it listens on loopback by default; the
Host header must name the address it serves (TrustedHostMiddleware: no DNS rebinding); a label
write is a JSON POST whose Origin, when sent, must be this app (a page elsewhere cannot label
with your token); and the content security policy allows only this app's own scripts, styles
and images (PNGs arrive as data: URLs), with no network assets at all.
"""
from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spurguard.client import Client
from spurguard.client.cli.parser import UI_POLL_S, UI_TOP, UI_TOP_K
from spurguard.ui import gateway
from spurguard.ui.events import label_watch, relay
from spurguard.ui.gateway import Problem
from spurguard.vocab.display import HEATMAP_DISPLAY_PERCENTILE, heatmap_css_gradient

_HERE = resources.files("spurguard.ui")
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_NOTE_BYTES = 64 * 1024  # a label request body; the server's own note limit is 10 000 characters


@dataclass(frozen=True)
class UiSettings:
    """What `spurguard ui` was started with (see its --help)."""

    host: str = "127.0.0.1"
    port: int = 8080
    top: int = UI_TOP  # components per class page
    top_k: int = UI_TOP_K  # top images per component
    steps: int | None = None  # attack steps; None: the server's default
    heatmap: str | None = None  # None: the server's default method
    poll_s: float = UI_POLL_S  # how often live labels are read


def _int(request: Request, name: str) -> int:
    try:
        return int(request.path_params[name])
    except ValueError:
        raise Problem(404, "NOT_FOUND", "Not found.", f"{name} must be a whole number") from None


class SecurityHeaders:
    """ASGI middleware: `_HEADERS` on every response (streams included) that does not set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


class LabellingApp:
    """The routes, bound to one client and its settings."""

    def __init__(self, client: Client, settings: UiSettings) -> None:
        self.client = client
        self.settings = settings
        self.templates = Jinja2Templates(directory=str(_HERE / "templates"))
        self.templates.env.globals.update(server=client.target, heatmap_percentile=HEATMAP_DISPLAY_PERCENTILE)

    def starlette(self, allowed_hosts: list[str]) -> Starlette:
        routes = [
            Route("/", self.models),
            Route("/models/{model}", self.model),
            Route("/models/{model}/classes/{class_index}", self.class_page),
            Route("/api/models/{model}/classes/{class_index}/components/{component}/label", self.label,
                  methods=["POST"]),
            Route("/events/models/{model}/classes/{class_index}/labels", self.label_events),
            Route("/events/models/{model}/classes/{class_index}/components/{component}/visualize",
                  self.visualize_events),
            Route("/colour-scale.css", self.colour_scale),
            Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
        ]
        middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts), Middleware(SecurityHeaders)]
        return Starlette(routes=routes, middleware=middleware,
                         exception_handlers={Problem: self.problem, 404: self.not_found, Exception: self.failed})

    # ---- pages ----

    def _page(self, request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
        return self.templates.TemplateResponse(request, template, context, status_code=status)

    async def models(self, request: Request) -> Response:
        data = await run_in_threadpool(gateway.models_page, self.client)
        return self._page(request, "models.html", data)

    async def model(self, request: Request) -> Response:
        model = request.path_params["model"]
        data = await run_in_threadpool(gateway.model_page, self.client, model, self.settings.top)
        return self._page(request, "model.html", data)

    async def class_page(self, request: Request) -> Response:
        model, k = request.path_params["model"], _int(request, "class_index")
        data = await run_in_threadpool(gateway.class_page, self.client, model, k, self.settings.top)
        script = {"model": model, "class_index": k, "labels": data["labels"]}
        return self._page(request, "class.html", dict(data, script=script))

    async def problem(self, request: Request, problem: Exception) -> Response:
        assert isinstance(problem, Problem)
        if request.url.path.startswith("/api/"):
            return JSONResponse(problem.to_dict(), status_code=problem.status)
        return self._page(request, "problem.html", {"problem": problem}, problem.status)

    async def failed(self, request: Request, error: Exception) -> Response:
        """A bug of the ui itself: said in words (the traceback goes to its log, not the page)."""
        return await self.problem(request, Problem(
            500, "INTERNAL", "The labelling page itself failed; nothing was changed on the server.",
            f"{type(error).__name__} (see spurguard ui's output)"))

    async def not_found(self, request: Request, error: Exception) -> Response:
        return await self.problem(request, Problem(404, "NOT_FOUND", "No such page.", request.url.path))

    async def colour_scale(self, request: Request) -> Response:
        css = f".colour-scale .bar {{ background: {heatmap_css_gradient()}; }}\n"
        return Response(css, media_type="text/css")

    # ---- label writes ----

    async def label(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            raise Problem(403, "PERMISSION_DENIED", "Labels can only be set from this page.",
                          f"a request from {origin} was refused")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise Problem(415, "INVALID_ARGUMENT", "The page sent something other than JSON.", "")
        body = await request.body()
        try:
            if len(body) > MAX_NOTE_BYTES:
                raise ValueError("request too large")
            payload = json.loads(body)
            label, note = payload["label"], payload.get("note", "")
            if not isinstance(label, str) or not isinstance(note, str):
                raise ValueError("label and note must be strings")
        except (ValueError, KeyError, TypeError) as error:
            raise Problem(400, "INVALID_ARGUMENT", "The page sent a request the ui cannot read.", str(error)) from None
        model, k, c = request.path_params["model"], _int(request, "class_index"), _int(request, "component")
        record = await run_in_threadpool(gateway.set_label, self.client, model, k, c, label, note)
        return JSONResponse(record)

    # ---- live streams ----

    def _events(self, events: AsyncIterator[str]) -> Response:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"X-Accel-Buffering": "no", "Cache-Control": "no-store"})

    async def label_events(self, request: Request) -> Response:
        model, k = request.path_params["model"], _int(request, "class_index")
        return self._events(label_watch(
            lambda: gateway.watch_labels(self.client, model, k), gateway.snapshot_of,
            lambda: gateway.labels_snapshot(self.client, model, k), self.client.target, self.settings.poll_s,
        ))

    async def visualize_events(self, request: Request) -> Response:
        model, k, c = request.path_params["model"], _int(request, "class_index"), _int(request, "component")
        s = self.settings

        def open_stream() -> Any:
            return self.client.visualize(model, k, [c], steps=s.steps, top_k=s.top_k, heatmap=s.heatmap)  # type: ignore[arg-type]

        return self._events(relay(open_stream, self.client.target))


def allowed_hosts(host: str, port: int) -> list[str]:
    """The Host headers this app answers: the address it listens on (and loopback names for a
    loopback or wildcard address), with and without the port."""
    names = {host}
    if host in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    return sorted(names | {f"{name}:{port}" for name in names})


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free one), bound before uvicorn starts so the address
    printed is the real one and a port in use is a clear error at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def create_app(client: Client, settings: UiSettings, port: int) -> Starlette:
    return LabellingApp(client, settings).starlette(allowed_hosts(settings.host, port))
