"""What every inference route does once it has a tensor: one call into the data plane
(`Catalog.infer`), with the client watched, so the work of a client that has gone away
is dropped before it is computed instead of being computed for nobody.

`Inference` is that, for one request, with what both protocols need beside it (the
model lookup, the limits, the metrics, the deadline): one dependency for the hot routes
instead of four, because FastAPI solves every dependency of every request and on the
inference paths that cost more than the JSON encoding (README, Benchmark).
"""

import asyncio
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from fastapi import Request

from service.batching import Outputs
from service.catalog import Catalog, Served
from service.config import Settings
from service.errors import ClientGone
from service.metrics import Metrics


class Answer(NamedTuple):
    served: Served  # the version that computed it
    outputs: Outputs
    inference_ms: float  # from hand-over to answer


@dataclass(frozen=True)
class Inference:
    request: Request
    catalog: Catalog
    metrics: Metrics
    settings: Settings
    deadline: float  # on the event loop's clock (LimitsMiddleware)

    def model(self, model_id: str | None, version: str | None) -> Served:
        """The model version that answers (NotFound otherwise), named on the request
        for metrics and the access log."""
        served = self.catalog.get(model_id, version)
        self.request.state.model_id = served.model_id
        self.request.state.model_version = served.version
        return served

    async def run(self, model_id: str | None, version: str | None, images: np.ndarray) -> Answer:
        """Every output for `images` from the version that answers now.

        Looked up again at hand-over, with no await before the batcher takes the images:
        a version replaced or removed while the body was read or decoded has left the
        catalog and drains, so a request that named no version goes to the new one (one
        that pinned the old version gets 404) instead of a 503 from a stopped batcher."""
        served = self.model(model_id, version)
        request, metrics = self.request, self.metrics
        labels = (served.model_id, served.version)
        task = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(_cancel_when_gone(request, task))
        request.state.images = len(images)
        metrics.in_flight.labels(*labels).inc()
        start = asyncio.get_running_loop().time()
        try:
            result = await self.catalog.infer(served, images, self.deadline)
        except asyncio.CancelledError:
            # Our watcher cancelled us (the client left): answer with a status for the logs
            # and metrics. Any other cancellation (shutdown) goes on up.
            if watcher.done() and not watcher.cancelled() and task.uncancel() == 0:
                raise ClientGone(
                    "the client closed the connection; its request was dropped"
                ) from None
            raise
        finally:
            watcher.cancel()
            metrics.in_flight.labels(*labels).dec()
        waited = asyncio.get_running_loop().time() - start
        request.state.queue_ms = round(result.queue_seconds * 1000, 3)
        request.state.inference_ms = round(result.inference_seconds * 1000, 3)
        metrics.queue_seconds.labels(*labels).observe(result.queue_seconds)
        metrics.images.labels(*labels).inc(len(images))
        return Answer(served, result.outputs, waited * 1000)


async def _cancel_when_gone(request: Request, task: asyncio.Task) -> None:
    # The body has been read: the next message the server gives is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    task.cancel()
