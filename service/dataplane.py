"""The data plane: from a decoded tensor to a model's outputs, the same for every protocol.

It owns what /predict and /v2 share: the model lookup (404 before any work), the bound on
large decodes, the hand-over to the model version's micro-batcher (queue bound, batch
cap, deadline), dropping the work of a client that has gone away, readiness, and filling
the request's record for the metrics and the access log. Routes decode, call it, encode.
Knows nothing of HTTP beyond the ASGI `receive` it watches for a disconnect.
"""

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import numpy as np
from starlette.types import Receive

from service.batching import Outputs
from service.catalog import Catalog, Served
from service.config import Settings
from service.errors import ClientGone, NotReady
from service.limits import DecodeSlots
from service.metrics import Metrics, RequestRecord
from service.modelcard import OUTPUT_NAME

T = TypeVar("T")
STARTING = "starting: the models are loading"


class Answer(NamedTuple):
    served: Served  # the version that computed it
    outputs: Outputs
    inference_ms: float  # from hand-over to answer


@dataclass
class DataPlane:
    settings: Settings
    metrics: Metrics
    keyed: bool = False  # API keys are required (auth.validate found some)
    draining: threading.Event = field(default_factory=threading.Event)
    catalog: Catalog | None = None  # set by the lifespan once the models are loaded
    decode_slots: DecodeSlots = field(init=False)

    def __post_init__(self) -> None:
        self.decode_slots = DecodeSlots(self.settings.max_large_decodes)

    def not_ready_reason(self) -> str | None:
        """None when a model can take requests; else why not (shutdown first)."""
        if self.draining.is_set():
            return "shutting down"
        if self.catalog is None:
            return STARTING
        if self.catalog.ready:
            return None
        if self.catalog.failures and self.keyed:
            # Health is open to probes; with keys set, file names are for key holders.
            return (f"no model could be loaded ({len(self.catalog.failures)} file(s) failed: "
                    "GET /models with a key lists them)")  # fmt: skip
        return self.catalog.not_ready_reason()

    def loaded(self) -> Catalog:
        """The catalog; NotReady while the lifespan is still loading it."""
        if self.catalog is None:
            raise NotReady(STARTING)
        return self.catalog

    def model(self, record: RequestRecord, model_id: str | None, version: str | None) -> Served:
        """The model version that answers (UnknownModel otherwise), named on the record."""
        served = self.loaded().get(model_id, version)
        record.model_id, record.model_version = served.model_id, served.version
        return served

    async def decode(self, work: Callable[[], T]) -> T:
        """Decoding that is more than a 32x32 image: in a thread, a few requests at once."""
        return await self.decode_slots.run(work)

    async def infer(
        self,
        record: RequestRecord,
        receive: Receive,
        model_id: str | None,
        version: str | None,
        images: np.ndarray,
        outputs: Sequence[str] = (OUTPUT_NAME,),
    ) -> Answer:
        """`outputs` for `images` from the version that answers now (only those are
        copied back from onnxruntime: on a GPU, features cost ten times probabilities).

        Looked up again at hand-over, with no await before the batcher takes the images:
        a version replaced or removed while the body was read or decoded has left the
        catalog and drains, so a request that named no version goes to the new one (one
        that pinned the old version gets 404) instead of a 503 from a stopped batcher."""
        served = self.model(record, model_id, version)
        labels = (served.model_id, served.version)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(_cancel_when_gone(receive, task))
        record.images = len(images)
        self.metrics.in_flight.labels(*labels).inc()
        start = loop.time()
        try:
            result = await served.batcher.predict(images, record.deadline, outputs)
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
            self.metrics.in_flight.labels(*labels).dec()
        waited = loop.time() - start
        record.queue_ms = round(result.queue_seconds * 1000, 3)
        record.inference_ms = round(result.inference_seconds * 1000, 3)
        self.metrics.queue_seconds.labels(*labels).observe(result.queue_seconds)
        self.metrics.images.labels(*labels).inc(len(images))
        return Answer(served, result.outputs, waited * 1000)


async def _cancel_when_gone(receive: Receive, task: asyncio.Task) -> None:
    # The body has been read: the next message the server gives is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()
