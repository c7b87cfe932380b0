"""Prometheus metrics: requests and latency per route, model and status; batch sizes.

Each app gets its own registry, so apps built side by side (as in tests) do not clash.
With several uvicorn workers, set PROMETHEUS_MULTIPROC_DIR (make serve and the image do):
every worker then writes its values there and /metrics adds them up across workers.
"""

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["route", "model", "status"]
        self.requests = Counter(
            "http_requests_total", "HTTP requests", labels, registry=self.registry
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Images per onnxruntime call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "images_classified_total", "Images classified", ["model"], registry=self.registry
        )
        self.dropped = Counter(
            "images_dropped_total",
            "Images not computed: shed (queue full), expired (deadline passed), abandoned "
            "(client gone), failed (inference error)",
            ["model", "reason"],
            registry=self.registry,
        )


def exposition(metrics: Metrics) -> bytes:
    """The text format for /metrics: this process's values, or every worker's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(metrics.registry)


class MetricsMiddleware:
    """Times every HTTP request (pure ASGI: no per-request task or body copy)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            labels = (
                route_template(scope),
                scope.get("state", {}).get("model_id", ""),  # set by /predict
                str(status),
            )
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)


def route_template(scope: Scope) -> str:
    """The matched route's template (/models/{model_id}), never the raw path: a label per
    URL ever asked for would grow without bound. Unknown paths share one bucket."""
    route = scope.get("route")  # set by FastAPI's own routes
    if route is None:  # /openapi.json, /docs and mounts are plain Starlette routes
        for candidate in scope["app"].router.routes:
            if candidate.matches(scope)[0] == Match.FULL:
                route = candidate
                break
    return getattr(route, "path", None) or "unmatched"
