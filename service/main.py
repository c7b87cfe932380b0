"""The FastAPI app: `uvicorn --factory service.main:create_app`. Models load in the lifespan."""

import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service.batching import MicroBatcher
from service.catalog import load_catalog
from service.config import get_settings
from service.errors import install_handlers
from service.logs import configure_logging
from service.metrics import Metrics, MetricsMiddleware
from service.routes import models, operations, predict

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    catalog = load_catalog(settings)  # raises DeviceUnavailable: DEVICE=cuda without CUDA
    if settings.batching:
        for model_id, model in catalog.models.items():
            batcher = MicroBatcher(
                model.predict,
                max_batch=settings.batch_max_size,
                max_wait=settings.batch_max_wait_ms / 1000,
                on_batch=app.state.metrics.batch_size.labels(model_id).observe,
            )
            batcher.start()
            catalog.batchers[model_id] = batcher
    app.state.catalog = catalog
    log.info("ready" if catalog.ready else "started without a model", extra={
        "models": {m.model_id: m.provider for m in catalog.models.values()},
        "default_model": catalog.default_id,
        "batching": settings.batching,
        "onnx_threads": settings.onnx_threads,
        "workers": settings.workers,
    })  # fmt: skip
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        log.warning("several workers without PROMETHEUS_MULTIPROC_DIR: /metrics is per worker")
    yield
    for batcher in catalog.batchers.values():
        await batcher.stop()


def create_app() -> FastAPI:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    app = FastAPIOffline(  # Swagger UI and ReDoc served from the installed package: no CDN
        title="CIFAR-100 classifier",
        summary="Classify 32x32 images into the 100 CIFAR-100 classes and 20 superclasses.",
        version="0.1.0",
        lifespan=lifespan,
        max_body_size=settings.max_request_bytes,  # refused while streaming, never buffered
    )
    app.state.metrics = Metrics()
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_handlers(app, settings)
    for router in (predict.router, models.router, operations.router):
        app.include_router(router)
    return app
