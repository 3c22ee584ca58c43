"""Prometheus metrics of the server, on their own registry and HTTP port (`--metrics-port`).

Why an own registry: the default one also collects process and platform series and is shared
by everything in the process (tests start several servers in one); an own registry exposes
exactly the documented series, once per server. Names and meanings follow Triton's: counters
per RPC outcome, queue vs compute time of the dynamic batcher, in seconds, labelled by model.
Model labels only ever carry names of loaded models ("" otherwise), so a client cannot grow the
label space by sending made-up names.
"""
from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from spurguard.server.serving.batcher import BatchStats

# Unary calls take milliseconds; Fit and Evaluate streams can run for an hour.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                     30.0, 60.0, 300.0, 1800.0, 3600.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The server's series; every method is safe to call from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "spurguard_requests", "RPCs finished, by method, model and gRPC status code",
            ["rpc", "model", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "spurguard_request_duration_seconds", "Wall time of an RPC, streams included",
            ["rpc", "model"], buckets=_DURATION_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "spurguard_batch_size", "Images per forward pass of the dynamic batcher",
            ["model"], buckets=_BATCH_BUCKETS, registry=r,
        )
        self.queue_duration = Histogram(
            "spurguard_queue_duration_seconds", "Time an image waited in the batcher before its batch started",
            ["model"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.compute_duration = Histogram(
            "spurguard_compute_duration_seconds", "Time of one batch: forward pass, decomposition and SpuFix",
            ["model"], buckets=_STAGE_BUCKETS, registry=r,
        )
        self.triggers = Counter(
            "spurguard_spurious_triggers", "Scored images whose prediction SpuFix moved away from their class",
            ["model", "class"], registry=r,
        )
        self.images_scored = Counter(
            "spurguard_images_scored", "Images scored successfully by Score and ScoreStream",
            ["model"], registry=r,
        )
        self.attack_steps = Counter(
            "spurguard_attack_steps", "Feature-attack steps run by Visualize (one forward and backward pass each)",
            ["model"], registry=r,
        )
        self.attack_duration = Histogram(
            "spurguard_attack_duration_seconds", "Compute time of one Visualize feature attack (all its components)",
            ["model"], buckets=_DURATION_BUCKETS, registry=r,
        )
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def observe_request(self, rpc: str, model: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, model, code).inc()
        self.request_duration.labels(rpc, model).observe(seconds)

    def observe_batch(self, model: str, stats: BatchStats) -> None:
        self.batch_size.labels(model).observe(stats.size)
        self.compute_duration.labels(model).observe(stats.compute_s)
        queue = self.queue_duration.labels(model)
        for seconds in stats.queue_s:
            queue.observe(seconds)

    def observe_scores(self, model: str, scored: int, trigger_classes: list[int]) -> None:
        """`scored` images done; one entry in `trigger_classes` per image that triggered."""
        self.images_scored.labels(model).inc(scored)
        for k in trigger_classes:
            self.triggers.labels(model, str(k)).inc()

    def observe_attack(self, model: str, steps: int, seconds: float) -> None:
        self.attack_steps.labels(model).inc(steps)
        self.attack_duration.labels(model).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (`port` 0 picks a free one)."""
        self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
