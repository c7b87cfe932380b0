"""The data plane: from a request to a model's outputs, the same for every transport.

It owns what /predict, /v2 over HTTP and gRPC share: the model lookup (404 / NOT_FOUND
before any work), decoding and encoding the Open Inference Protocol's tensors (the codec,
service/codec.py), the bound on large decodes, the hand-over to the model version's
micro-batcher (queue bound, batch cap, deadline), dropping the work of a caller that has
gone away, readiness, and filling the request's context for the metrics and the access
log. Transports turn their message into a call here and the answer into their message;
it knows nothing of them beyond the `RequestContext` they built (service/context.py).
"""

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import numpy as np

from contract import occlusion
from contract.modelcard import FAMILIARITY_NAME, IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME
from service import codec
from service import outputs as answers
from service.admission import Admission, Door
from service.batching import Outputs
from service.catalog import Catalog, Served
from service.codec import InferenceRequest
from service.config import Settings
from service.context import RequestContext
from service.decoding import DecodeSlots, read_images
from service.errors import (
    BadParameter,
    ClientGone,
    InvalidTensor,
    NotReady,
    TooManyImages,
    Unfamiliar,
)
from service.metrics import Metrics
from service.outputs import InferenceResponse
from service.payloads import PayloadLog
from service.rollout import Rollouts
from service.shadow import Shadows

T = TypeVar("T")
STARTING = "starting: the models are loading"
SERVER_NAME = "cifar100-classifier"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data", "classification")  # of the Open Inference Protocol
PLATFORM = "onnxruntime_onnx"


class Answer(NamedTuple):
    served: Served  # the version that computed it
    outputs: Outputs
    inference_ms: float  # from hand-over to answer


class Decoded(NamedTuple):
    """An Open Inference Protocol request, validated, and its images uint8 [N, 32, 32, 3]."""

    request: InferenceRequest
    images: np.ndarray


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
    payloads: PayloadLog | None = None  # set by the lifespan when PAYLOAD_LOG is set
    rollouts: Rollouts | None = None  # set by the lifespan with the catalog
    shadows: Shadows | None = None  # ... and the worker that runs shadow copies
    decode_slots: DecodeSlots = field(init=False)
    admission: Admission = field(init=False)  # service/admission.py
    door: Door = field(init=False)  # every transport's admission decision

    def __post_init__(self) -> None:
        self.decode_slots = DecodeSlots(self.settings.max_large_decodes)
        self.admission = Admission(self.settings.max_queue_delay_ms / 1000)
        self.door = Door(self.admission, self.metrics.shed_at_door)

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

    def model(self, context: RequestContext, model_id: str | None, version: str | None) -> Served:
        """The model version that answers (UnknownModel otherwise), named on the context: the
        one asked for, else the canary's candidate for its share of callers (rollouts),
        else the serving one."""
        catalog = self.loaded()
        if version is None and self.rollouts is not None:
            version = self.rollouts.choose(model_id, context)
        served = catalog.get(model_id, version)
        context.model_id, context.model_version = served.model_id, served.version
        return served

    # --- the Open Inference Protocol: metadata, decode, infer or explain, encode ----------

    def model_metadata(self, model_id: str, version: str | None) -> dict:
        """Platform, versions, and every input and output with its datatype and shape
        (-1: the batch dimension)."""
        catalog = self.loaded()
        model = catalog.get(model_id, version).model
        return {
            "name": model.model_id,
            "versions": sorted(catalog.models[model.model_id]),
            "platform": PLATFORM,
            # Exactly one of them in a request: pixels, or encoded images (PNG, JPEG...).
            "inputs": [
                {"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE, 3]},
                {"name": codec.FILES_NAME, "datatype": "BYTES", "shape": [-1, 1]},
            ],
            "outputs": [
                {"name": name, "datatype": "FP32", "shape": [-1, width]}
                for name, width in model.output_widths.items()
            ],
        }

    async def decode(
        self, body: bytes, header_length: int | None = None, max_images: int | None = None
    ) -> Decoded:
        """An inference request's JSON body (binary tensors after `header_length` bytes)."""
        limit = max_images or self.settings.max_images_per_request
        request, tensor = codec.decode_request(body, header_length, limit)
        return Decoded(request, await self._pixels(request, tensor, limit))

    async def decode_fields(
        self,
        fields: dict,
        raw: bytes | None,
        elements: list[bytes] | None = None,
        max_images: int | None = None,
    ) -> Decoded:
        """The same request from a transport that parsed its own message (gRPC): its
        fields as Python values, and its input's raw bytes or BYTES elements if it sent
        them so."""
        request = codec.parse_fields(fields)
        limit = max_images or self.settings.max_images_per_request
        tensor = codec.decode_raw(request, raw, limit, elements)
        return Decoded(request, await self._pixels(request, tensor, limit))

    async def _pixels(
        self, request: InferenceRequest, tensor: codec.Tensor, max_images: int
    ) -> np.ndarray:
        """Pixels as they came, or encoded images decoded as /predict decodes them (its
        limits, its decode slots)."""
        if isinstance(tensor, np.ndarray):
            return tensor
        resize = request.parameters is not None and request.parameters.resize
        files = [(None, data) for data in tensor]
        return await read_images(files, resize, max_images, self.settings, self.decode_slots)

    def encode(self, response: InferenceResponse) -> tuple[bytes, int | None]:
        """The JSON (and binary) body of an answer, and the JSON's length if binary follows."""
        return answers.encode_response(response)

    async def infer_tensors(
        self, context: RequestContext, model_id: str, version: str | None, decoded: Decoded
    ) -> InferenceResponse:
        """The outputs a protocol request asks for, checked against the version that
        answers before any work, with its familiarity floor."""
        request = decoded.request
        asked: list[answers.RequestedOutput] = []

        def choose(served: Served) -> list[str]:
            asked[:] = answers.requested_outputs(request, served.model.output_widths)
            return [output.name for output in asked]

        floor = request.parameters.min_familiarity if request.parameters else None
        served, outputs, _ = await self.infer(context, model_id, version, decoded.images,
                                              choose, floor)  # fmt: skip
        tensors = answers.output_tensors(request, asked, outputs, served.model.card.class_names)
        return InferenceResponse(served.model_id, served.version, request.id, tensors)

    async def explain_tensors(
        self, context: RequestContext, model_id: str, version: str | None, decoded: Decoded
    ) -> InferenceResponse:
        """An explanation of a protocol request's one image, for its top class or
        `parameters.class`, as outputs."""
        request = decoded.request
        index = request.parameters.explain_class if request.parameters else None
        width = self.loaded().get(model_id, version).model.output_widths[OUTPUT_NAME]
        if index is not None and index >= width:
            raise InvalidTensor(f"class must be an id from 0 to {width - 1}")
        answer = await self.explain(context, model_id, version, decoded.images[0], index)
        tensors = answers.explanation_tensors(answer.heat_map, answer.class_index,
                                            answer.probability)  # fmt: skip
        return InferenceResponse(answer.served.model_id, answer.served.version, request.id,
                                 tensors)  # fmt: skip

    # --- images in, outputs out ----------------------------------------------------------

    async def infer(
        self,
        context: RequestContext,
        model_id: str | None,
        version: str | None,
        images: np.ndarray,
        outputs: Sequence[str] | Callable[[Served], Sequence[str]] = (OUTPUT_NAME,),
        min_familiarity: float | None = None,
    ) -> Answer:
        """`outputs` for `images` from the version that answers now (or the outputs a
        function of that version names: it may refuse them, before any work). Every
        answered image is watched (its familiarity and top probability, for drift); with a
        familiarity floor (the request's, else MIN_FAMILIARITY), an image below it is
        refused (422). A request that named no version may be copied to a shadow candidate
        (service/shadow.py) once answered. A sample of the answered images goes to the
        payload log, if on (for a shadowed request, once the candidate answered too)."""

        def plan(served: Served) -> tuple[set[str], float]:
            # For the version that answers: what to fetch, and the floor (422 before work).
            fetch = {*(outputs(served) if callable(outputs) else outputs), OUTPUT_NAME}
            if FAMILIARITY_NAME in served.model.output_widths:
                fetch.add(FAMILIARITY_NAME)
            return fetch, self._familiarity_floor(served, min_familiarity)

        answer, floor = await self._compute(context, model_id, version, images, plan)
        self._watch(answer)
        if floor:
            _refuse_unfamiliar(answer.outputs[FAMILIARITY_NAME][:, 0], floor)
        shadowed = (version is None and self.shadows is not None
                    and self.shadows.offer(context, answer.served, images, answer.outputs,
                                           round(answer.inference_ms, 3)))  # fmt: skip
        if self.payloads is not None and not shadowed:
            self.payloads.offer(context, answer.served, images, answer.outputs,
                                round(answer.inference_ms, 3))  # fmt: skip
        return answer

    async def explain(
        self,
        context: RequestContext,
        model_id: str | None,
        version: str | None,
        image: np.ndarray,
        class_index: int | None = None,
    ) -> Explanation:
        """Occlusion sensitivity of one uint8 [32, 32, 3] image for `class_index` (else
        its top class): `occlusion.count` images of work, sent as one request, so the queue
        bound, the batch cap and the deadline count every copy."""
        patch, stride = self.settings.explain_patch, self.settings.explain_stride
        if (work := occlusion.count(patch, stride)) > self.settings.max_images_per_request:
            raise TooManyImages(
                f"an explanation is {work} images of work (EXPLAIN_PATCH={patch}, "
                f"EXPLAIN_STRIDE={stride}), more than MAX_IMAGES_PER_REQUEST="
                f"{self.settings.max_images_per_request}; raise the stride"
            )
        copies = occlusion.copies(image, patch, stride)
        answer, _ = await self._compute(context, model_id, version, copies,
                                        lambda served: ({OUTPUT_NAME}, 0.0))  # fmt: skip
        probabilities = answer.outputs[OUTPUT_NAME]
        index = int(probabilities[0].argmax()) if class_index is None else class_index
        heat = occlusion.heat_map(probabilities, index, patch, stride)
        return Explanation(answer.served, index, float(probabilities[0, index]), heat,
                           answer.inference_ms)  # fmt: skip

    async def _compute(
        self,
        context: RequestContext,
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
        served = self.model(context, model_id, version)
        outputs, planned = plan(served)
        metrics = self.metrics.for_model(served.model_id, served.version)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        gone = context.gone
        watcher = None if gone is None else loop.create_task(_cancel_when_gone(gone, task))
        context.images = len(images)
        metrics.in_flight.inc()
        start = loop.time()
        try:
            result = await served.batcher.predict(images, context.deadline, sorted(outputs))
        except asyncio.CancelledError:
            # Our watcher cancelled us (the client left): answer with a status for the logs
            # and metrics. Any other cancellation (shutdown, a transport's own) goes on up.
            if (watcher is not None and watcher.done() and not watcher.cancelled()
                    and task.uncancel() == 0):  # fmt: skip
                raise ClientGone(
                    "the client closed the connection; its request was dropped"
                ) from None
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            metrics.in_flight.dec()
        waited = loop.time() - start
        context.queue_ms = round(result.queue_seconds * 1000, 3)
        context.inference_ms = round(result.inference_seconds * 1000, 3)
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


async def _cancel_when_gone(gone: Callable[[], Awaitable[None]], task: asyncio.Task) -> None:
    await gone()
    task.cancel()
