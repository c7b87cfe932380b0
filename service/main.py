"""The FastAPI app. Start it with `python -m service` (service/server.py): the app needs
its settings passed in, so no other way of starting it runs without the server's limits.

Models load in the lifespan, never at import."""

import asyncio
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from prometheus_client import multiprocess

from contract.images import bound_metadata
from service import auth, server
from service.catalog import load_catalog
from service.config import Settings, get_settings
from service.dataplane import SERVER_VERSION, DataPlane
from service.http.asgi import DIRECT, DirectRoute
from service.http.door import GATE, Gate
from service.http.errors import install_handlers
from service.http.keys import ApiKeys
from service.http.middleware import HttpMiddleware
from service.logs import configure_logging
from service.metrics import Metrics
from service.payloads import payload_log
from service.rollout import rollouts_for
from service.routes import explain, models, operations, page, predict, rollout, v2
from service.rpc import server as rpc
from service.shadow import Shadows

log = logging.getLogger(__name__)
CORS_HEADERS = ["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout",
                "Inference-Header-Content-Length"]  # fmt: skip


@asynccontextmanager
async def lifespan(app: FastAPI):
    plane: DataPlane = app.state.plane
    settings = plane.settings
    # DeviceUnavailable stops startup; every batch tells the door how fast models run.
    plane.catalog = catalog = await load_catalog(settings, plane.metrics, plane.admission.batch_ran)
    log.info("ready" if catalog.ready else "started without a model", extra={
        "models": {f"{s.model_id} {s.version}": str(s.model.way) for s in catalog.served()},
        "default_model": catalog.default_id, "batching": settings.batching,
        "onnx_threads": settings.onnx_threads, "workers": settings.workers,
    })  # fmt: skip
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("several workers without PROMETHEUS_MULTIPROC_DIR: /metrics is per worker")
    server.drain_on_sigterm(plane.draining, settings.shutdown_drain_seconds)
    plane.payloads = payload_log(settings, plane.metrics)  # None unless PAYLOAD_LOG is set
    # Rollouts (ROLLOUT_FILE) pin each model's serving version before anything is answered.
    plane.rollouts = rollouts_for(catalog, settings.rollout_path)
    plane.shadows = Shadows(settings, plane.metrics, catalog, plane.rollouts, plane.admission,
                            plane.payloads)  # fmt: skip
    plane.shadows.start()
    if settings.admin_keys and settings.workers > 1 and not settings.model_poll_seconds:
        log.warning(
            "several workers without MODEL_POLL_SECONDS: a rollout changed through the admin "
            "routes reaches the other workers only when they restart"
        )
    watcher = asyncio.create_task(catalog.watch()) if settings.model_poll_seconds else None
    grpc_server = None
    if settings.grpc_port:  # the same data plane over gRPC, on this loop
        grpc_server, app.state.grpc_port = await rpc.start(plane, app.state.keys)
    # The server's HTTP protocol asks the door before any ASGI code runs (service/server.py).
    yield {GATE: Gate(plane.door, plane.draining)}
    if grpc_server is not None:  # uvicorn has stopped taking requests: so does gRPC
        await rpc.stop(grpc_server, settings.graceful_shutdown_seconds)
    if watcher is not None:
        watcher.cancel()
    await plane.shadows.stop()  # copies not yet compared are dropped: nobody waits for them
    await catalog.stop()
    if plane.payloads is not None:  # nothing more is answered: write the last shard
        await asyncio.to_thread(plane.payloads.close)
    if plane.metrics.multiprocess:  # this worker's live gauges leave the sums
        multiprocess.mark_process_dead(os.getpid())


def create_app(settings: Settings) -> FastAPI:
    configure_logging(settings.log_level, settings.log_json)
    bound_metadata()
    app = FastAPIOffline(  # Swagger UI and ReDoc served from the installed package: no CDN
        title="CIFAR-100 classifier",
        summary="Classify 32x32 images into the 100 CIFAR-100 classes and 20 superclasses.",
        version=SERVER_VERSION,
        lifespan=lifespan,
        # The service's telemetry is its Prometheus metrics and access lines. FastAPI's
        # native OpenTelemetry would ask on every request whether a provider is set up
        # (environment lookups, about 4 µs), and the hot path bypasses it anyway.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.keys = keys = auth.validate(settings)  # a broken key setting stops startup
    app.state.plane = plane = DataPlane(settings, Metrics(), keyed=bool(keys))
    protected = (predict.router, explain.router, v2.router, models.router)  # by API_KEYS, when set
    routes = [route for router in protected for route in router.routes]
    # The admin routes check ADMIN_KEYS themselves (service/routes/rollout.py), not API_KEYS.
    for router in (*protected, v2.health, operations.router, page.router, rollout.router):
        app.include_router(router)
    # The hot paths: answered by bare ASGI apps, documented by their routes' signatures.
    setattr(app.state, DIRECT, {predict.predict: predict.PredictApp(plane),
                                v2.model_infer: v2.InferApp(plane)})  # fmt: skip
    direct = [route for route in routes if isinstance(route, DirectRoute)]
    # One layer: the door first (a refused request costs no more than that), then the
    # request id, the API key, the bounds, the metrics and the access line.
    app.add_middleware(HttpMiddleware, plane=plane, keys=ApiKeys(keys, routes) if keys else None,
                       direct=direct)  # fmt: skip
    if settings.cors_origins:  # a page served elsewhere may call the API (and read a 503)
        exposed = ["X-Request-ID", "Retry-After", "Inference-Header-Content-Length"]
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=CORS_HEADERS,
                           expose_headers=exposed)  # fmt: skip
    install_handlers(app)
    return app


def app() -> FastAPI:
    """What `python -m service` starts in each worker; refuses any other server."""
    if not server.guarded():
        raise RuntimeError("start the service with `python -m service` (service/server.py), "
                           "which sets the limits a public server needs")  # fmt: skip
    return create_app(get_settings())
