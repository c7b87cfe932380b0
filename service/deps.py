"""Dependencies, as Annotated aliases so route signatures read like English."""

from typing import Annotated

from fastapi import Depends, Request

from service.catalog import Catalog
from service.config import Settings, get_settings
from service.metrics import Metrics


def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
