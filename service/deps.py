"""Dependencies, as Annotated aliases so route signatures read like English.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker
thread, and three thread hops per request cost more than the whole image decode.
"""

from typing import Annotated

from fastapi import Depends, Request

from service.catalog import Catalog
from service.config import Settings, get_settings
from service.metrics import Metrics
from service.routes.inference import Inference


async def settings() -> Settings:
    return get_settings()


async def catalog(request: Request) -> Catalog:
    return request.app.state.catalog


async def metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def inference(request: Request) -> Inference:
    state = request.app.state
    return Inference(request, state.catalog, state.metrics, get_settings(), request.state.deadline)


SettingsDep = Annotated[Settings, Depends(settings)]
CatalogDep = Annotated[Catalog, Depends(catalog)]
MetricsDep = Annotated[Metrics, Depends(metrics)]
InferenceDep = Annotated[Inference, Depends(inference)]
