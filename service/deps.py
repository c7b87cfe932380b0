"""Dependencies, as Annotated aliases so route signatures read like English. The app's
state is reached here and nowhere else.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker
thread, and a thread hop per request costs more than a 32x32 image decode.
"""

from typing import Annotated

from fastapi import Depends, Request

from service.catalog import Catalog
from service.dataplane import DataPlane
from service.metrics import RequestRecord, record_of


async def plane(request: Request) -> DataPlane:
    return request.app.state.plane


async def catalog(request: Request) -> Catalog:
    return request.app.state.plane.loaded()


async def record(request: Request) -> RequestRecord:
    return record_of(request.scope)


PlaneDep = Annotated[DataPlane, Depends(plane)]
CatalogDep = Annotated[Catalog, Depends(catalog)]
RecordDep = Annotated[RequestRecord, Depends(record)]
