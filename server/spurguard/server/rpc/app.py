"""Server assembly and `spurguard serve`: grpc.aio with spurguard.v1 and the Open Inference
Protocol's service (rpc.inference) on one port, health, reflection, metrics, limits and graceful
shutdown.

Lifecycle (KServe / Triton style): the store first clears what killed processes left (temp files,
fit scratch, unfinished fits past --keep-unfinished-days) and marks the jobs of dead servers
interrupted; then the port opens at once with health `liveness` SERVING and every readiness name
NOT_SERVING; models load and warm up in the background, each turning SERVING when ready, then the
server ("" and spurguard.v1.Spurguard) does and one line `spurguard serving on HOST:PORT` goes to
stdout. On SIGTERM / SIGINT: readiness NOT_SERVING at once (load balancers stop routing) and
running fit jobs are cancelled (their finished classes stay in the store, resumable), while calls
are still answered for the drain delay (a second signal ends it early); then no new calls are
accepted, in-flight calls get the grace period to finish, and the process exits 0.

Public builder API (tests, the demo, notebooks):
    config = ServerConfig(models=("path/to/model_dir",), store=Path("store"), port=0)
    with BackgroundServer(config) as server:          # its own event-loop thread
        Client(server.address).list_models()
or, inside an event loop: `server = SpurguardServer(config); await server.start();
await server.wait_ready(); ...; await server.stop()`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from spurguard.server.backends import Backend
from spurguard.server.backends.builtins import model_name
from spurguard.server.backends.device import available_cpus, resolve_device
from spurguard.server.backends.runtimes import RUNTIME_CHOICES
from spurguard.server.errors import InvalidInput, SpurguardError, Unavailable
from spurguard.server.rpc import auth, inference
from spurguard.server.rpc.envargs import LIST_SEPARATOR, EnvArgumentParser
from spurguard.server.rpc.health import Health
from spurguard.server.rpc.logformat import LOG_FORMATS, configure_logging
from spurguard.server.rpc.servicer import SpurguardServicer
from spurguard.server.serving.dataplane import DataPlane
from spurguard.server.serving.decoding import DecodePool
from spurguard.server.serving.jobs import DEFAULT_MAX_QUEUED, JobRegistry
from spurguard.server.serving.metrics import Metrics
from spurguard.server.serving.models import ModelRegistry, ServedModel
from spurguard.server.serving.options import MAX_REQUEST_PIXELS
from spurguard.server.serving.paths import DataRoots
from spurguard.server.store import Store
from spurguard.v1 import spurguard_pb2 as pb
from spurguard.v1 import spurguard_pb2_grpc as pb_grpc
from spurguard.vocab import SPUFIX_MODES, SpufixModeName

log = logging.getLogger("spurguard.server")

# After the drain delay: how long new calls meet the closing gate (UNAVAILABLE) before grpc's own
# shutdown, which cancels calls it has received but not yet handed to a handler.
GATE_SETTLE_S = 0.2
REMOTE_HEALTH_POLL_S = 1.0  # how often the health of Triton-served models follows Triton's readiness
MIN_MESSAGE_MB = 64  # the documented limit clients rely on (spurguard.client.MAX_MESSAGE_BYTES)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Spurguard"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
ENV_PREFIX = "SPURGUARD_"  # every serve flag is also a variable: --grace-s is SPURGUARD_GRACE_S (SPEC §3)
DEFAULT_LOG_FORMAT = "text"


@dataclass(frozen=True)
class ServerConfig:
    """Everything `spurguard serve` takes; see `build_parser` for the meaning of each."""

    models: tuple[str, ...]
    store: Path
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # plain HTTP: kept on loopback unless asked, whatever `host` is
    data_roots: tuple[Path, ...] = ()
    device: str = "auto"
    max_batch_size: int | None = None
    max_delay_ms: float = 5.0
    spufix_default: SpufixModeName = "floor"
    max_message_mb: int = MIN_MESSAGE_MB
    grace_s: float = 10.0
    drain_delay_s: float = 5.0  # on SIGTERM, calls are still answered this long after readiness turns NOT_SERVING
    max_request_images: int = 1024
    max_request_pixels: int = MAX_REQUEST_PIXELS
    fit_workers: int = 1
    store_poll_s: float = 2.0
    labels: str = "sqlite"  # where labels and job records live: sqlite (in the store) or a postgresql:// URL
    max_heavy_calls: int = 2
    max_waiting_heavy_calls: int = 8  # Visualize/Evaluate calls waiting for a slot; more: RESOURCE_EXHAUSTED
    max_queued_jobs: int = DEFAULT_MAX_QUEUED  # fit jobs waiting for a worker; more: RESOURCE_EXHAUSTED
    keep_unfinished_days: float = 7.0  # an unfinished fit untouched this long is removed at start-up
    runtime: str | None = None  # forward runtime for every model; None: each model's own (default auto)
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key: the port speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # clients must show a certificate this CA signed (mutual TLS)
    auth_tokens: Path | None = None  # TOML of [[token]] name, role, sha256 (rpc.auth); None: no auth


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidInput(f"cannot read the {what} {path}: {error.strerror or error}") from None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files, or None for a plaintext port."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise InvalidInput("--tls-client-ca needs --tls-cert and --tls-key: client certificates need TLS")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise InvalidInput("give both --tls-cert and --tls-key")
    pair = (_read_pem(config.tls_key, "TLS key"), _read_pem(config.tls_cert, "TLS certificate"))
    client_ca = None if config.tls_client_ca is None else _read_pem(config.tls_client_ca, "client CA")
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ClosingGate(auth.RefusingInterceptor):
    """Once closed, new calls get UNAVAILABLE here, which clients retry elsewhere. grpc's own
    shutdown answers calls that arrive while it begins with CANCELLED, which they do not retry;
    closing this gate first leaves that race only to calls already on their way. Health stays
    open: it answers NOT_SERVING to the probes until the port closes."""

    def __init__(self) -> None:
        self.closed = False

    async def refuse(self, details: grpc.HandlerCallDetails) -> SpurguardError | None:
        if not self.closed or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return None
        return Unavailable("the server is shutting down; call another replica")


class SpurguardServer:
    """One server: the gRPC port, its models, jobs and store, and the metrics endpoint.

    `backends` are served besides `config.models`, already built (tests, the demo).
    """

    def __init__(self, config: ServerConfig, backends: Sequence[Backend] = ()) -> None:
        self.config = config
        self._backends = list(backends)
        self.port: int | None = None  # set once the port is open
        self.metrics_port: int | None = None
        self._stopped = False
        self._gate = _ClosingGate()
        self._ready = False  # every model loaded once: from then on load balancers may route here
        self._delay_over = asyncio.Event()  # set early by a second SIGTERM (end_drain_delay)
        self._following: asyncio.Task[None] | None = None
        # The rest is built by start(), inside the event loop it will run on.
        self.metrics: Metrics
        self.store: Store
        self.models: ModelRegistry
        self.jobs: JobRegistry
        self.health: Health

    @property
    def address(self) -> str:
        """HOST:PORT clients connect to (the bound port, also when `config.port` is 0)."""
        if self.port is None:
            raise RuntimeError("the server is not started")
        return _address(self.config.host, self.port)

    async def start(self) -> None:
        """Open the port and start loading the models; returns before they are ready."""
        config = self.config
        if not config.models and not self._backends:
            raise InvalidInput("no model to serve: give at least one --model")
        resolve_device(config.device)  # a bad --device fails now, not after the port opened
        tokens = None if config.auth_tokens is None else auth.TokenFile(config.auth_tokens)  # a bad file fails here
        self.metrics = Metrics()
        self.store = await asyncio.to_thread(Store, config.store, config.labels)  # PostgreSQL: connects, migrates
        try:
            await self._start_serving(tokens)
        except BaseException:
            await asyncio.to_thread(self.store.close)
            raise

    async def _start_serving(self, tokens: auth.TokenFile | None) -> None:
        """start() once the store is open: models, jobs, recovery, the port."""
        config = self.config
        self._decode_pool = DecodePool(available_cpus())
        options = {
            "device": config.device,
            "max_batch_size": config.max_batch_size,
            "max_delay_s": config.max_delay_ms / 1000.0,
            "store_poll_s": config.store_poll_s,
            "runtime": config.runtime,
            "max_request_pixels": config.max_request_pixels,
        }
        served = [
            ServedModel(model_name(spec), self.store, self.metrics, self._decode_pool, spec=spec, **options)
            for spec in config.models
        ] + [
            ServedModel(backend.name, self.store, self.metrics, self._decode_pool, backend=backend, **options)
            for backend in self._backends
        ]
        self.models = ModelRegistry(served)
        self.jobs = JobRegistry(asyncio.get_running_loop(), self.store.jobs, workers=config.fit_workers,
                                max_queued=config.max_queued_jobs)
        await asyncio.to_thread(self._recover)
        self.health = Health(["", SERVICE_NAME, *(m.name for m in self.models)])

        limit = config.max_message_mb * 2**20
        self._server = grpc.aio.server(
            interceptors=[self._gate, *([] if tokens is None else [auth.AuthInterceptor(tokens)])],
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
            ]
        )
        plane = DataPlane(
            self.models,
            self.store,
            self.jobs,
            DataRoots(config.data_roots),
            spufix_default=config.spufix_default,
            max_request_images=config.max_request_images,
            max_heavy_calls=config.max_heavy_calls,
            max_waiting_heavy_calls=config.max_waiting_heavy_calls,
        )
        pb_grpc.add_SpurguardServicer_to_server(SpurguardServicer(plane, self.metrics), self._server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            inference.InferenceServicer(plane, self.metrics, draining=lambda: self._stopped), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, inference.SERVICE_NAME, HEALTH_SERVICE,
             reflection.SERVICE_NAME),
            self._server,
        )
        try:
            credentials = server_credentials(config)
            address = _address(config.host, config.port)
            if credentials is None:
                port = self._server.add_insecure_port(address)
            else:
                port = self._server.add_secure_port(address, credentials)
                log.info("TLS on%s", "; client certificates required" if config.tls_client_ca else "")
            await self._server.start()
            if config.metrics_port is not None:
                self.metrics_port = self.metrics.serve(config.metrics_host, config.metrics_port)
        except BaseException:
            await self._server.stop(None)
            self._decode_pool.shutdown()
            raise
        self.port = port
        if tokens is not None:
            log.info("auth on: %d tokens from %s", len(tokens.tokens), tokens.path)
        exposure = auth.exposure_warning(config.host, auth=tokens is not None, tls=credentials is not None)
        if exposure:
            log.warning("%s", exposure)
        if self.metrics_port is not None:
            log.info("metrics on http://%s/metrics", _address(config.metrics_host, self.metrics_port))
        self._loading = asyncio.create_task(self._load_models())

    def _recover(self) -> None:
        """Clear what killed servers left in the store, and settle the jobs they were running."""
        for fit in self.store.remove_leftovers(self.config.keep_unfinished_days):
            log.info("removed unfinished fit %s: untouched for over %g days (--keep-unfinished-days)",
                     fit, self.config.keep_unfinished_days)
        for job_id in self.store.jobs.settle():
            log.warning("job %s was interrupted by the end of the server that ran it; "
                        "fit again with its job id to resume it", job_id)

    async def _load_models(self) -> None:
        for model in self.models:
            seconds = await model.start()
            log.info("model %s ready (loaded and warmed up in %.1f s)", model.name, seconds)
            self.health.set_ready(model.name, True)
        self.health.set_ready("", True)
        self.health.set_ready(SERVICE_NAME, True)
        self._ready = True
        remote = [model for model in self.models if await asyncio.to_thread(model.remote_ready) is not None]
        if remote:
            self._following = asyncio.create_task(self._follow_remote_health(remote))

    async def _follow_remote_health(self, models: list[ServedModel]) -> None:
        """A model whose forward runs on Triton is SERVING only while Triton says it is ready:
        NOT_SERVING while Triton is away, SERVING again by itself when it is back."""
        while True:
            await asyncio.sleep(REMOTE_HEALTH_POLL_S)
            for model in models:
                ready = bool(await asyncio.to_thread(model.remote_ready))
                if ready != model.remote_serving:
                    model.remote_serving = ready
                    log.warning("model %s: its Triton server is %s", model.name, "back" if ready else "not ready")
                    self.health.set_ready(model.name, ready)

    async def wait_ready(self) -> None:
        """Until every model is loaded and warmed up; raises the error of a model that failed to."""
        await asyncio.shield(self._loading)

    def end_drain_delay(self) -> None:
        """Stop answering new calls now rather than at the end of the drain delay (a second SIGTERM)."""
        self._delay_over.set()

    async def stop(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """Graceful shutdown (idempotent): readiness NOT_SERVING and fit jobs cancelled at once;
        calls still answered for `drain_delay` seconds (none if the server never was ready: no
        load balancer routes to it), then refused, and in-flight ones drained for `grace`
        seconds. None: the config's."""
        if self._stopped or self.port is None:
            return
        self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        drain_delay = self.config.drain_delay_s if drain_delay is None else drain_delay
        self.health.drain()
        self._loading.cancel()
        if self._following is not None:
            self._following.cancel()
        jobs_done = asyncio.create_task(self.jobs.shutdown())
        if self._ready and drain_delay > 0:
            log.info("draining: readiness NOT_SERVING, new calls still answered for %.1f s", drain_delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._delay_over.wait(), drain_delay)
        log.info("refusing new calls; in-flight ones may take %.1f s", grace)
        self.health.close()
        self._gate.closed = True
        for model in self.models:
            model.label_changes.end()  # WatchLabels streams end now (clients reconnect), not at grace's end
        await asyncio.sleep(GATE_SETTLE_S)  # calls grpc has already taken in meet the gate, not its shutdown
        await self._server.stop(grace)
        await jobs_done
        for model in self.models:
            await model.close()
        self._decode_pool.shutdown()
        await asyncio.to_thread(self.store.close)
        self.metrics.close()
        log.info("server stopped")


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM / SIGINT; the exit code of `spurguard serve`."""
    server = SpurguardServer(config)
    try:
        await server.start()
    except (SpurguardError, RuntimeError, OSError) as error:
        log.error("spurguard serve: %s", error)
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()


    def on_signal() -> None:
        if stop.is_set():
            server.end_drain_delay()  # a second signal: refuse new calls now (in-flight ones still drain)
        else:
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    stopping = asyncio.create_task(stop.wait())
    ready = asyncio.create_task(server.wait_ready())
    try:
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            return 0  # stopped while loading
        error = ready.exception()
        if error is not None:  # with the traceback unless it is one of ours, which says all
            log.error("spurguard serve: a model failed to load: %s", error,
                      exc_info=None if isinstance(error, SpurguardError) else error)
            return 1
        print(f"spurguard serving on {server.address}", flush=True)
        await stopping
        log.info("shutting down (drain delay %.1f s, grace %.1f s)", config.drain_delay_s, config.grace_s)
        return 0
    finally:
        ready.cancel()
        stopping.cancel()
        await server.stop()


class BackgroundServer:
    """A SpurguardServer on its own event-loop thread, so the caller can use blocking clients.

    `start()` returns once every model is ready; use it as a context manager to stop it.
    """

    def __init__(self, config: ServerConfig, backends: Sequence[Backend] = ()) -> None:
        self.server = SpurguardServer(config, backends)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def start(self, timeout: float = 300.0) -> BackgroundServer:
        """Start the loop thread and the server; returns when every model is ready."""
        if self._thread is not None:
            raise RuntimeError("a BackgroundServer starts once")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(self._loop,), name="spurguard-server", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout)
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    async def _start(self) -> None:
        await self.server.start()
        await self.server.wait_ready()

    def stop(self, grace: float | None = None, drain_delay: float | None = 0.0) -> None:
        """Graceful stop (see SpurguardServer.stop), then end the loop thread; idempotent.

        No drain delay unless asked (None: the config's): no load balancer routes to a server
        inside a test or a notebook."""
        if self._thread is None or self._loop is None or not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(grace, drain_delay), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer, refused below `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message for a non-number
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def _message_mb(text: str) -> int:
    value = int(text)
    if value < MIN_MESSAGE_MB:
        raise argparse.ArgumentTypeError(
            f"must be >= {MIN_MESSAGE_MB}: clients send requests of up to {MIN_MESSAGE_MB} MiB"
        )
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_DEFAULTS = ServerConfig(models=(), store=Path())


def _default(name: str) -> Any:
    """A flag's default is the config's, so the two cannot drift apart."""
    return getattr(_DEFAULTS, name)


def build_parser(prog: str = "spurguard serve", environ: Mapping[str, str] = os.environ) -> EnvArgumentParser:
    """The arguments of `spurguard serve` (the CLI hands them to `main`); each flag's `dest` is
    the ServerConfig field it sets, and each flag also reads its SPURGUARD_* variable of `environ`."""
    p = EnvArgumentParser(
        prog=prog, env_prefix=ENV_PREFIX, environ=environ,
        description="Serve models over gRPC (spurguard.v1.Spurguard).",
        epilog=f"Every flag can also be set by the variable named beside it ({ENV_PREFIX}<FLAG>: upper case, "
               f"'-' -> '_'); the flag wins over its variable. A repeatable flag's variable is a "
               f"'{LIST_SEPARATOR}'-separated list, e.g. {ENV_PREFIX}MODEL=demo{LIST_SEPARATOR}/models/mycnn.",
    )
    p.add_argument("--model", dest="models", action="append", required=True, metavar="SPEC",
                   help="built-in model name or model directory; repeat for several models")
    p.add_argument("--store", required=True, type=Path, metavar="DIR", help="fits (and, with --labels sqlite, labels) live here")
    p.add_argument("--labels", default=_default("labels"), metavar="URL",
                   help="where labels and job records live: sqlite (labels.sqlite3 in --store) or a PostgreSQL "
                        "database, postgresql://USER@HOST:PORT/DB, that replicas share and that pushes every label "
                        "change to them at once; its first start imports the store's labels.sqlite3 "
                        f"(default {_default('labels')})")
    p.add_argument("--host", default=_default("host"),
                   help=f"address to listen on (default {_default('host')}; 0.0.0.0: all)")
    p.add_argument("--port", type=_port, default=_default("port"),
                   help=f"gRPC port (default {_default('port')}; 0: pick a free one)")
    p.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0: pick a free one)")
    p.add_argument("--metrics-host", default=_default("metrics_host"), metavar="HOST",
                   help=f"address the plain-HTTP metrics endpoint listens on, whatever --host is "
                        f"(default {_default('metrics_host')})")
    p.add_argument("--data-root", dest="data_roots", action="append", type=Path, default=[], metavar="DIR",
                   help="folders Fit and Evaluate may read datasets under, and Visualize fit images (repeatable); "
                        "a symlink leading out of them is refused; none: no dataset")
    p.add_argument("--device", default=_default("device"), help=f"auto, cpu, cuda or cuda:N (default {_default('device')})")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default=_default("runtime"),
                   help="where forward-only work (fit, score, evaluate) runs; auto: the fastest installed runtime "
                        "whose features equal torch's, measured at load (default: each model's model.toml "
                        "runtime, else auto). Visualize always uses torch")
    p.add_argument("--max-batch-size", type=_positive_int, metavar="N",
                   help="images per forward pass (default: 32 on CPU, 64-256 on GPU)")
    p.add_argument("--max-delay-ms", type=_non_negative, default=_default("max_delay_ms"), metavar="MS",
                   help=f"longest an image waits for others to share its forward pass (default {_default('max_delay_ms'):g})")
    p.add_argument("--spufix-default", choices=SPUFIX_MODES, default=_default("spufix_default"),
                   help=f"SpuFix mode when a request names none (default {_default('spufix_default')})")
    p.add_argument("--max-message-mb", type=_message_mb, default=_default("max_message_mb"), metavar="MB",
                   help=f"largest gRPC message either way, MiB (default and minimum {MIN_MESSAGE_MB})")
    p.add_argument("--max-request-images", type=_positive_int, default=_default("max_request_images"), metavar="N",
                   help="most images in one Score request; more is RESOURCE_EXHAUSTED "
                        f"(default {_default('max_request_images')})")
    p.add_argument("--max-request-pixels", type=_positive_int, default=_default("max_request_pixels"), metavar="N",
                   help="most pixels the images of one Score or ModelInfer request (or ScoreStream message) may decode to, "
                        "read from their headers before decoding (a large JPEG counts at the reduced scale it "
                        f"decodes at); more is RESOURCE_EXHAUSTED (default {_default('max_request_pixels')})")
    p.add_argument("--fit-workers", type=_positive_int, default=_default("fit_workers"), metavar="N",
                   help=f"fit and transfer jobs running at once; more wait QUEUED, up to --max-queued-jobs (default {_default('fit_workers')})")
    p.add_argument("--max-queued-jobs", type=_non_negative_int, default=_default("max_queued_jobs"), metavar="N",
                   help="fit and transfer jobs that may wait QUEUED for a worker; more are RESOURCE_EXHAUSTED "
                        f"(default {_default('max_queued_jobs')})")
    p.add_argument("--keep-unfinished-days", type=_non_negative, default=_default("keep_unfinished_days"),
                   metavar="DAYS",
                   help="an unfinished (killed or cancelled) fit can be resumed with its job id until it has been "
                        "untouched this long; then it is removed at start-up "
                        f"(default {_default('keep_unfinished_days'):g})")
    p.add_argument("--drain-delay-s", type=_non_negative, default=_default("drain_delay_s"), metavar="S",
                   help="on SIGTERM, how long new calls are still answered after readiness turns NOT_SERVING, so "
                        "that load balancers stop routing here first; a second SIGTERM ends it "
                        f"(default {_default('drain_delay_s'):g})")
    p.add_argument("--grace-s", type=_non_negative, default=_default("grace_s"), metavar="S",
                   help="on SIGTERM, after the drain delay: how long in-flight calls may take to finish "
                        f"(default {_default('grace_s'):g})")
    p.add_argument("--max-heavy-calls", type=_positive_int, default=_default("max_heavy_calls"), metavar="N",
                   help="Visualize and Evaluate calls computing at once; more wait their turn, up to "
                        f"--max-waiting-heavy-calls (default {_default('max_heavy_calls')})")
    p.add_argument("--max-waiting-heavy-calls", type=_non_negative_int, default=_default("max_waiting_heavy_calls"),
                   metavar="N",
                   help="Visualize and Evaluate calls that may wait for their turn; more are RESOURCE_EXHAUSTED "
                        f"(default {_default('max_waiting_heavy_calls')})")
    p.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="serve TLS with this certificate chain (with --tls-key); default: plaintext")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
    p.add_argument("--auth-tokens", type=Path, metavar="FILE",
                   help="require `authorization: Bearer TOKEN` on every call but health checks and reflection: a TOML "
                        "file of [[token]] tables with name, role (score < label < admin) and sha256 (the "
                        "token's hex digest); re-read when it changes. Default: no auth")
    p.add_argument("--store-poll-s", type=_non_negative, default=_default("store_poll_s"), metavar="S",
                   help="how often to pick up labels and fits that other servers sharing --store made "
                        f"(default {_default('store_poll_s'):g}; 0: only this server's own); with a "
                        "postgresql --labels they arrive at once besides")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=DEFAULT_LOG_FORMAT,
                   help="log records on stderr as text lines or as JSON lines (time, level, logger, message, "
                        f"exception) for a log collector; stdout only ever has the ready line (default {DEFAULT_LOG_FORMAT})")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The parsed flags as a config: every field by its own name."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(ServerConfig)}
    return ServerConfig(**{**values, "models": tuple(values["models"]), "data_roots": tuple(values["data_roots"])})


def main(argv: list[str] | None = None) -> int:
    """`spurguard serve …`: returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format)
    config = config_from_args(args)
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
