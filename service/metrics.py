"""What each request leaves behind: Prometheus metrics, a request id and one access line.

Each app gets its own registry, so apps built side by side (as in tests) do not clash.
With several uvicorn workers, set PROMETHEUS_MULTIPROC_DIR (make serve and the image do):
every worker then writes its values there and /metrics adds them up across workers.
Every model metric is labelled with the model id and the version (the file's content
hash) that answered.
"""

import logging
import os
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

from service.context import RequestContext

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Familiarity is a share of the validation set (uniform there by construction): fine
# buckets near 0, where unfamiliar images fall. The top class's probability: tenths.
FAMILIARITY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
PAYLOAD_DROP_REASONS = ("queue_full", "write_error", "over_cap")  # service/payloads.py
SHADOW_SHED_REASONS = ("queue_full", "busy")  # service/shadow.py
# A candidate's familiarity minus the serving version's, image by image: symmetric, fine
# near 0 where two close versions of one model fall.
SHIFT_BUCKETS = (-0.5, -0.25, -0.1, -0.05, -0.01, 0.0, 0.01, 0.05, 0.1, 0.25, 0.5)

access_log = logging.getLogger("service.access")


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model version's series, bound once: prometheus_client's `labels()` costs a lock,
    a dictionary lookup and an environment check on every call, several per request."""

    in_flight: Gauge
    queue_seconds: Histogram
    images: Counter
    familiarity: Histogram
    top_probability: Histogram


@dataclass(frozen=True, slots=True)
class ShadowMetrics:
    """One (model, serving version, candidate)'s shadow series, bound once."""

    compared: Counter
    agreed: Counter
    errors: Counter
    familiarity_shift: Histogram
    candidate_seconds: Histogram
    shed: dict[str, Counter]


class Metrics:
    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self._http: dict[tuple[str, str, str, str], tuple[Counter, Histogram]] = {}
        self._shadows: dict[tuple[str, str, str], ShadowMetrics] = {}
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        model = ["model", "version"]
        http = ["route", *model, "status"]

        def histogram(name: str, doc: str, labels: list[str], buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        self.requests = Counter(
            "http_requests_total",
            "Requests (HTTP and gRPC), by route or RPC",
            http,
            registry=self.registry,
        )
        self.latency = histogram(
            "http_request_duration_seconds",
            "Request latency (HTTP and gRPC), by route or RPC",
            http,
            LATENCY_BUCKETS,
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
        self.engine = Gauge(
            "model_version_engine_info",
            "1 while this version is computed by this engine, in this precision, on this "
            "device, with these instructions (contract/engines.py); 0 once unloaded",
            [*model, "engine", "precision", "device", "instructions"],
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        # Sampled payload logging (service/payloads.py), when PAYLOAD_LOG is set.
        self.payloads_logged = Counter(
            "payload_images_logged_total",
            "Sampled images written to a payload shard",
            registry=self.registry,
        )
        self.payloads_dropped = Counter(
            "payload_images_dropped_total",
            "Sampled images not logged: queue_full (the writer was behind), write_error (the "
            "folder could not be written: full, read-only), over_cap (a shard above "
            "PAYLOAD_MAX_BYTES)",
            ["reason"],
            registry=self.registry,
        )
        for reason in PAYLOAD_DROP_REASONS:  # at zero from the start, logging on or off
            self.payloads_dropped.labels(reason)
        self.payload_bytes = Gauge(
            "payload_bytes_on_disk",
            "Bytes of payload shards in PAYLOAD_LOG, as the writer last counted them",
            multiprocess_mode="livemax",  # every worker counts the whole folder
            registry=self.registry,
        )
        # Shadowing (service/shadow.py): a candidate's answers to copies of live requests,
        # compared with the serving version's. Agreement ratio: agreed / compared.
        shadow = [*model, "candidate"]
        self.shadow_compared = Counter(
            "shadow_images_compared_total",
            "Images answered by the serving version and, on a copy, by the candidate",
            shadow,
            registry=self.registry,
        )
        self.shadow_agreed = Counter(
            "shadow_images_agreed_total",
            "Compared images whose top class was the same for both versions",
            shadow,
            registry=self.registry,
        )
        self.shadow_errors = Counter(
            "shadow_candidate_errors_total",
            "Shadow copies the candidate failed to answer (an error, its deadline, unloaded)",
            shadow,
            registry=self.registry,
        )
        self.shadow_shed = Counter(
            "shadow_images_shed_total",
            "Shadow copies dropped before the candidate saw them: queue_full (over "
            "SHADOW_QUEUE_IMAGES), busy (the door was refusing live requests)",
            [*shadow, "reason"],
            registry=self.registry,
        )
        self.shadow_familiarity_shift = histogram(
            "shadow_familiarity_shift",
            "Per compared image, the candidate's familiarity minus the serving version's "
            "(both files with the familiarity output only)",
            shadow,
            SHIFT_BUCKETS,
        )
        self.shadow_candidate_seconds = histogram(
            "shadow_candidate_seconds",
            "Candidate's time per shadow copy, hand-over to answer (the serving version's is "
            "inference_queue_seconds and inference_seconds)",
            shadow,
            LATENCY_BUCKETS,
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

    def served_by(self, model_id: str, version: str, serving: dict, value: int = 1) -> None:
        """Which engine, precision, device and instructions compute this version (1), or
        computed it until it was unloaded (0)."""
        self.engine.labels(model_id, version, *(str(serving.get(key) or "") for key in (
            "engine", "precision", "device", "instructions"))).set(value)  # fmt: skip

    def for_model(self, model_id: str, version: str) -> ModelMetrics:
        key = (model_id, version)
        if (bound := self._models.get(key)) is None:
            series = (self.in_flight, self.queue_seconds, self.images, self.familiarity,
                      self.top_probability)  # fmt: skip
            bound = self._models[key] = ModelMetrics(*(m.labels(*key) for m in series))
        return bound

    def for_shadow(self, model_id: str, serving: str, candidate: str) -> ShadowMetrics:
        key = (model_id, serving, candidate)
        if (bound := self._shadows.get(key)) is None:
            series = (self.shadow_compared, self.shadow_agreed, self.shadow_errors,
                      self.shadow_familiarity_shift, self.shadow_candidate_seconds)  # fmt: skip
            shed = {r: self.shadow_shed.labels(*key, r) for r in SHADOW_SHED_REASONS}
            bound = self._shadows[key] = ShadowMetrics(*(m.labels(*key) for m in series), shed)
        return bound

    def for_request(self, labels: tuple[str, str, str, str]) -> tuple[Counter, Histogram]:
        """The request counter and latency histogram of (route, model, version, status)."""
        if (bound := self._http.get(labels)) is None:
            bound = self._http[labels] = (self.requests.labels(*labels),
                                          self.latency.labels(*labels))  # fmt: skip
        return bound

    def finish(
        self, context: RequestContext, route: str, method: str, status: str, seconds: float
    ) -> None:
        """A request is answered: its count, latency and access line. `route` is a route
        template or an RPC's full name, never a raw path (a label per URL ever asked for
        would grow without bound); `status` the HTTP status or the gRPC code's name."""
        count, latency = self.for_request((route, context.model_id, context.model_version, status))
        count.inc()
        latency.observe(seconds)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("request", extra={
                "request_id": context.request_id, "method": method, "route": route,
                "status": int(status) if status.isdigit() else status,
                "model": context.model_id or None, "version": context.model_version or None,
                "images": context.images, "queue_ms": context.queue_ms,
                "inference_ms": context.inference_ms, "total_ms": round(seconds * 1000, 3),
            })  # fmt: skip

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
