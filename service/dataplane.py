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

from service import explain
from service.admission import Admission
from service.batching import Outputs
from service.catalog import Catalog, Served
from service.config import Settings
from service.errors import BadParameter, ClientGone, NotReady, TooManyImages, Unfamiliar
from service.limits import DecodeSlots
from service.metrics import Metrics, RequestRecord
from service.modelcard import FAMILIARITY_NAME, OUTPUT_NAME

T = TypeVar("T")
STARTING = "starting: the models are loading"


class Answer(NamedTuple):
    served: Served  # the version that computed it
    outputs: Outputs
    inference_ms: float  # from hand-over to answer


class Explanation(NamedTuple):
    served: Served
    class_index: int  # the class explained
    probability: float  # its probability on the image itself
    heat_map: np.ndarray  # float32 [32, 32]: how much covering each pixel lowered it
    inference_ms: float


@dataclass
class DataPlane:
    settings: Settings
    metrics: Metrics
    keyed: bool = False  # API keys are required (auth.validate found some)
    draining: threading.Event = field(default_factory=threading.Event)
    catalog: Catalog | None = None  # set by the lifespan once the models are loaded
    decode_slots: DecodeSlots = field(init=False)
    admission: Admission = field(init=False)  # the door (service/admission.py)

    def __post_init__(self) -> None:
        self.decode_slots = DecodeSlots(self.settings.max_large_decodes)
        self.admission = Admission(self.settings.max_queue_delay_ms / 1000)

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
        min_familiarity: float | None = None,
    ) -> Answer:
        """`outputs` for `images` from the version that answers now. Every answered image
        is watched (its familiarity and top probability, for drift); with a familiarity
        floor (the request's, else MIN_FAMILIARITY), an image below it is refused (422)."""

        def plan(served: Served) -> tuple[set[str], float]:
            # For the version that answers: what to fetch, and the floor (422 before work).
            fetch = {*outputs, OUTPUT_NAME}
            if FAMILIARITY_NAME in served.model.output_widths:
                fetch.add(FAMILIARITY_NAME)
            return fetch, self._familiarity_floor(served, min_familiarity)

        answer, floor = await self._compute(record, receive, model_id, version, images, plan)
        self._watch(answer)
        if floor:
            _refuse_unfamiliar(answer.outputs[FAMILIARITY_NAME][:, 0], floor)
        return answer

    async def explain(
        self,
        record: RequestRecord,
        receive: Receive,
        model_id: str | None,
        version: str | None,
        image: np.ndarray,
        class_index: int | None = None,
    ) -> Explanation:
        """Occlusion sensitivity of one uint8 [32, 32, 3] image for `class_index` (else
        its top class): `explain.count` images of work, sent as one request, so the queue
        bound, the batch cap and the deadline count every copy."""
        patch, stride = self.settings.explain_patch, self.settings.explain_stride
        if (work := explain.count(patch, stride)) > self.settings.max_images_per_request:
            raise TooManyImages(
                f"an explanation is {work} images of work (EXPLAIN_PATCH={patch}, "
                f"EXPLAIN_STRIDE={stride}), more than MAX_IMAGES_PER_REQUEST="
                f"{self.settings.max_images_per_request}; raise the stride"
            )
        copies = explain.copies(image, patch, stride)
        answer, _ = await self._compute(record, receive, model_id, version, copies,
                                        lambda served: ({OUTPUT_NAME}, 0.0))  # fmt: skip
        probabilities = answer.outputs[OUTPUT_NAME]
        index = int(probabilities[0].argmax()) if class_index is None else class_index
        heat = explain.heat_map(probabilities, index, patch, stride)
        return Explanation(answer.served, index, float(probabilities[0, index]), heat,
                           answer.inference_ms)  # fmt: skip

    async def _compute(
        self,
        record: RequestRecord,
        receive: Receive,
        model_id: str | None,
        version: str | None,
        images: np.ndarray,
        plan: Callable[[Served], tuple[set[str], float]],
    ) -> tuple[Answer, float]:
        """Hand `images` to the batcher of the version that answers now, with the outputs
        `plan` names for it (only those are copied back from onnxruntime: on a GPU,
        features cost ten times probabilities); its answer and `plan`'s other value.

        Looked up again at hand-over, with no await before the batcher takes the images:
        a version replaced or removed while the body was read or decoded has left the
        catalog and drains, so a request that named no version goes to the new one (one
        that pinned the old version gets 404) instead of a 503 from a stopped batcher."""
        served = self.model(record, model_id, version)
        outputs, planned = plan(served)
        metrics = self.metrics.for_model(served.model_id, served.version)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(_cancel_when_gone(receive, task))
        record.images = len(images)
        metrics.in_flight.inc()
        start = loop.time()
        try:
            result = await served.batcher.predict(images, record.deadline, sorted(outputs))
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
            metrics.in_flight.dec()
        waited = loop.time() - start
        record.queue_ms = round(result.queue_seconds * 1000, 3)
        record.inference_ms = round(result.inference_seconds * 1000, 3)
        metrics.queue_seconds.observe(result.queue_seconds)
        metrics.images.inc(len(images))
        return Answer(served, result.outputs, waited * 1000), planned

    def _familiarity_floor(self, served: Served, requested: float | None) -> float:
        """The floor that applies: the request's, else the setting's (0: none). A request
        that asks for one from a model without the output is told so; the setting applies
        to the models that have it."""
        if FAMILIARITY_NAME in served.model.output_widths:
            return self.settings.min_familiarity if requested is None else requested
        if requested:
            raise BadParameter(
                f"{served.model_id} {served.version} has no {FAMILIARITY_NAME!r} output (it "
                "was exported before it existed): it cannot apply min_familiarity"
            )
        return 0.0

    def _watch(self, answer: Answer) -> None:
        """Each answered image's top probability and familiarity, for drift dashboards."""
        metrics = self.metrics.for_model(answer.served.model_id, answer.served.version)
        for value in answer.outputs[OUTPUT_NAME].max(axis=1).tolist():
            metrics.top_probability.observe(value)
        if FAMILIARITY_NAME in answer.outputs:
            for value in answer.outputs[FAMILIARITY_NAME][:, 0].tolist():
                metrics.familiarity.observe(value)


def _refuse_unfamiliar(familiarity: np.ndarray, floor: float) -> None:
    if (below := np.flatnonzero(familiarity < floor)).size:
        first = int(below[0])
        raise Unfamiliar(
            f"image {first + 1} is unlike the images the model was trained on: its familiarity "
            f"is {familiarity[first]:.4f} (only {familiarity[first]:.1%} of the validation "
            f"images were stranger), below the minimum {floor} asked (min_familiarity); "
            f"{below.size} of {familiarity.size} image(s) below it"
        )


async def _cancel_when_gone(receive: Receive, task: asyncio.Task) -> None:
    # The body has been read: the next message the server gives is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()
