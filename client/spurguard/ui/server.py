"""Serving the labelling app: uvicorn on a socket bound first, in the foreground (`spurguard ui`)
or on a thread (tests, notebooks)."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import uvicorn

from spurguard.client import Client
from spurguard.ui.app import UiSettings, bind, create_app

__all__ = ["UiServer", "UiSettings"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTDOWN_S = 1.0  # open event streams (live labels never end by themselves) are closed after this


class UiServer:
    """One labelling app for one spurguard client; `url` is where a browser opens it."""

    def __init__(self, client: Client, settings: UiSettings) -> None:
        self._socket = bind(settings.host, settings.port)
        self.port = int(self._socket.getsockname()[1])
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.url = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '') else host}:{self.port}/"
        config = uvicorn.Config(create_app(client, settings, self.port), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=SHUTDOWN_S)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self, on_listening: Callable[[], None] = lambda: None) -> None:
        """Serve until Ctrl-C or SIGTERM, then return: a requested stop is not an error.

        Ours are the stop handlers from before `on_listening` (which says where to open the page)
        until the end: a signal before uvicorn has started asks it to stop as soon as it has;
        uvicorn stops gracefully on either signal and then re-raises it to the handlers it found,
        ours again, which only ask for the stop that is done (the default ones would exit 130 or
        die of SIGTERM after a clean stop)."""
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._stop) for sig in STOP_SIGNALS} if main else {}
        try:
            on_listening()
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self, *_: object) -> None:
        self._server.should_exit = True

    def start(self) -> UiServer:
        """Serve on a thread; returns once the app answers."""
        self._thread = threading.Thread(target=self.run, name="spurguard-ui", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the ui server stopped while starting")
            self._thread.join(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(SHUTDOWN_S + 10)

    def __enter__(self) -> UiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
