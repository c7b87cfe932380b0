"""Dependencies, as Annotated aliases so route signatures read like English. The app's
state is reached here and nowhere else.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker
thread, and a thread hop per request costs more than a 32x32 image decode.
"""

from typing import Annotated

from fastapi import Depends, Request

from service.catalog import Catalog
from service.context import RequestContext
from service.dataplane import DataPlane
from service.http.asgi import watch_disconnect
from service.http.door import context_of


async def plane(request: Request) -> DataPlane:
    return request.app.state.plane


async def catalog(request: Request) -> Catalog:
    return request.app.state.plane.loaded()


async def context(request: Request) -> RequestContext:
    """The request's context, told how to notice the client leaving (the ASGI disconnect
    after the body)."""
    found = context_of(request.scope)
    watch_disconnect(found, request.receive)
    return found


PlaneDep = Annotated[DataPlane, Depends(plane)]
CatalogDep = Annotated[Catalog, Depends(catalog)]
ContextDep = Annotated[RequestContext, Depends(context)]
