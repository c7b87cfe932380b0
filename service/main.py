"""The FastAPI app: `python -m service` (or `uvicorn --factory service.main:create_app`).

Models load in the lifespan, never at import."""

import asyncio
import logging
import os
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from service import auth
from service.catalog import load_catalog
from service.config import get_settings
from service.errors import install_handlers
from service.limits import DecodeSlots, LimitsMiddleware
from service.logs import configure_logging
from service.metrics import Metrics, MetricsMiddleware
from service.routes import models, operations, page, predict, v2
from service.server import drain_on_sigterm

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    # raises DeviceUnavailable: DEVICE=cuda without CUDA
    catalog = await load_catalog(settings, app.state.metrics)
    app.state.catalog = catalog
    log.info("ready" if catalog.ready else "started without a model", extra={
        "models": {f"{s.model_id} {s.version}": s.model.provider for s in catalog.served()},
        "default_model": catalog.default_id,
        "batching": settings.batching,
        "onnx_threads": settings.onnx_threads,
        "workers": settings.workers,
    })  # fmt: skip
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("several workers without PROMETHEUS_MULTIPROC_DIR: /metrics is per worker")
    drain_on_sigterm(app.state.draining, settings.shutdown_drain_seconds)
    watcher = asyncio.create_task(catalog.watch()) if settings.model_poll_seconds else None
    yield
    if watcher is not None:
        watcher.cancel()
    await catalog.stop()


def create_app() -> FastAPI:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    app = FastAPIOffline(  # Swagger UI and ReDoc served from the installed package: no CDN
        title="CIFAR-100 classifier",
        summary="Classify 32x32 images into the 100 CIFAR-100 classes and 20 superclasses.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = Metrics()
    app.state.draining = threading.Event()
    app.state.decode_slots = DecodeSlots(settings.max_large_decodes)
    app.add_middleware(LimitsMiddleware, settings=settings, draining=app.state.draining)
    auth.validate(settings)  # a broken API_KEYS_FILE stops startup, not every request
    protected = (predict.router, v2.router, models.router)  # by API_KEYS, when set
    if keys := auth.known_keys(settings.api_keys, settings.api_keys_file):
        routes = [route for router in protected for route in router.routes]
        app.add_middleware(auth.ApiKeyMiddleware, keys=keys, protected=routes)
    if settings.cors_origins:  # a page served elsewhere may call the API
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-Request-Timeout",
                           "Inference-Header-Content-Length"],
            expose_headers=["X-Request-ID", "Retry-After", "Inference-Header-Content-Length"],
        )  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_handlers(app, settings)
    for router in (*protected, v2.health, operations.router, page.router):
        app.include_router(router)
    return app
