"""What each request leaves behind: Prometheus metrics, a request id and one access line.

Each app gets its own registry, so apps built side by side (as in tests) do not clash.
With several uvicorn workers, set PROMETHEUS_MULTIPROC_DIR (make serve and the image do):
every worker then writes its values there and /metrics adds them up across workers.
Every model metric is labelled with the model id and the version (the file's content
hash) that answered.
"""

import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Familiarity is a share of the validation set (uniform there by construction): fine
# buckets near 0, where unfamiliar images fall. The top class's probability: tenths.
FAMILIARITY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
REQUEST_ID = b"x-request-id"
VALID_ID = re.compile(rb"[\w.:@/+=-]{1,128}")  # what we echo back and log, verbatim

access_log = logging.getLogger("service.access")


@dataclass(slots=True)
class RequestRecord:
    """What one request did, filled in as it goes (the limits set its deadline, the data
    plane the model and timings) and read once at the end for its metrics and log line.
    It travels in the ASGI scope's state, under `RECORD`."""

    request_id: str
    deadline: float = math.inf  # on the event loop's clock
    model_id: str = ""
    model_version: str = ""
    images: int | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None


RECORD = "record"


def record_of(scope: Scope) -> RequestRecord:
    return scope["state"][RECORD]


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model version's series, bound once: prometheus_client's `labels()` costs a lock,
    a dictionary lookup and an environment check on every call, several per request."""

    in_flight: Gauge
    queue_seconds: Histogram
    images: Counter
    familiarity: Histogram
    top_probability: Histogram


class Metrics:
    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self._http: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        model = ["model", "version"]
        http = ["route", *model, "status"]

        def histogram(name: str, doc: str, labels: list[str], buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.requests = Counter(
            "http_requests_total", "HTTP requests", http, registry=self.registry
        )
        self.latency = histogram(
            "http_request_duration_seconds", "HTTP request latency", http, LATENCY_BUCKETS
        )
        self.queue_seconds = histogram(
            "inference_queue_seconds",
            "Wait before a request's batch starts",
            model,
            LATENCY_BUCKETS,
        )
        self.inference_seconds = histogram(
            "inference_seconds", "onnxruntime time per batch", model, LATENCY_BUCKETS
        )
        self.batch_size = histogram(
            "inference_batch_size", "Images per onnxruntime call", model, BATCH_BUCKETS
        )
        self.familiarity = histogram(
            "prediction_familiarity",
            "Familiarity of each image answered: the share of validation images less like "
            "the training data (the model's familiarity output; models without it: none)",
            model,
            FAMILIARITY_BUCKETS,
        )
        self.top_probability = histogram(
            "prediction_top_probability",
            "Probability of the top fine class of each image answered",
            model,
            CONFIDENCE_BUCKETS,
        )
        self.shed_at_door = Counter(
            "requests_shed_at_door_total",
            "Inference requests refused at the door (503) because their expected wait was "
            "above MAX_QUEUE_DELAY_MS; never read, so they carry no model label",
            ["route"],
            registry=self.registry,
        )
        self.images = Counter(
            "images_classified_total", "Images classified", model, registry=self.registry
        )
        self.dropped = Counter(
            "images_dropped_total",
            "Images not computed: shed (queue full), expired (deadline passed), abandoned "
            "(client gone), failed (inference error)",
            [*model, "reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "inference_requests_in_flight",
            "Requests handed to a model and not yet answered",
            model,
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.loaded = Gauge(
            "model_version_loaded",
            "1 while this version of the model is served, 0 once it was unloaded",
            model,
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        if self.multiprocess:  # each worker's CPU and memory, labelled with its pid
            self.cpu = Gauge(
                "worker_cpu_seconds", "CPU time of a worker", multiprocess_mode="liveall",
                registry=self.registry,
            )  # fmt: skip
            self.rss = Gauge(
                "worker_resident_memory_bytes", "Resident memory of a worker",
                multiprocess_mode="liveall", registry=self.registry,
            )  # fmt: skip
        else:
            ProcessCollector(registry=self.registry)

    def for_model(self, model_id: str, version: str) -> ModelMetrics:
        key = (model_id, version)
        if (bound := self._models.get(key)) is None:
            series = (self.in_flight, self.queue_seconds, self.images, self.familiarity,
                      self.top_probability)  # fmt: skip
            bound = self._models[key] = ModelMetrics(*(m.labels(*key) for m in series))
        return bound

    def for_request(self, labels: tuple[str, str, str, str]) -> tuple[Counter, Histogram]:
        """The request counter and latency histogram of (route, model, version, status)."""
        if (bound := self._http.get(labels)) is None:
            bound = self._http[labels] = (self.requests.labels(*labels),
                                          self.latency.labels(*labels))  # fmt: skip
        return bound

    def sample_process(self) -> None:
        """Update this worker's CPU and memory gauges (multi-worker mode)."""
        if self.multiprocess:
            times = os.times()
            self.cpu.set(times.user + times.system)
            with open("/proc/self/statm") as statm:
                self.rss.set(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def exposition(metrics: Metrics) -> bytes:
    """The text format for /metrics: this process's values, or every worker's."""
    if metrics.multiprocess:
        metrics.sample_process()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(metrics.registry)


class MetricsMiddleware:
    """Per request (pure ASGI: no per-request task or body copy): a request id (the
    client's `X-Request-ID`, else a new one) returned on every response, errors too;
    the metrics; and one JSON access line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        request_id = (
            next(
                (v for k, v in scope["headers"] if k == REQUEST_ID and VALID_ID.fullmatch(v)), None
            )
            or uuid.uuid4().hex.encode()
        )
        record = RequestRecord(request_id.decode())
        scope.setdefault("state", {})[RECORD] = record

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            route = route_template(scope)
            count, latency = self.metrics.for_request(
                (route, record.model_id, record.model_version, str(status))
            )
            count.inc()
            latency.observe(seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("request", extra={
                    "request_id": record.request_id, "method": scope["method"],
                    "route": route, "status": status, "model": record.model_id or None,
                    "version": record.model_version or None, "images": record.images,
                    "queue_ms": record.queue_ms, "inference_ms": record.inference_ms,
                    "total_ms": round(seconds * 1000, 3),
                })  # fmt: skip


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
