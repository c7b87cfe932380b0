"""What every inference route does once it has a tensor: one call into the data plane
(`Catalog.infer`), with the client watched, so the work of a client that has gone away
is dropped before it is computed instead of being computed for nobody."""

import asyncio
import time

import numpy as np
from fastapi import Request

from service.batching import Outputs
from service.catalog import Catalog
from service.classifier import Classifier
from service.errors import ClientGone
from service.metrics import Metrics


async def infer(
    request: Request,
    catalog: Catalog,
    metrics: Metrics,
    model: Classifier,
    images: np.ndarray,
    deadline: float,
) -> tuple[Outputs, float]:
    """Every output for `images`, and the milliseconds from hand-over to answer."""
    task = asyncio.current_task()
    watcher = asyncio.get_running_loop().create_task(_cancel_when_gone(request, task))
    start = time.perf_counter()
    try:
        outputs = await catalog.infer(model, images, deadline)
    except asyncio.CancelledError:
        # Our watcher cancelled us (the client left): answer with a status for the logs
        # and metrics. Any other cancellation (shutdown) goes on up.
        if watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
            raise ClientGone("the client closed the connection; its request was dropped") from None
        raise
    finally:
        watcher.cancel()
    metrics.images.labels(model.model_id).inc(len(images))
    return outputs, (time.perf_counter() - start) * 1000


async def _cancel_when_gone(request: Request, task: asyncio.Task) -> None:
    # The body has been read: the next message the server gives is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    task.cancel()
