"""Each RPC of `inference.GRPCInferenceService` as a call on the data plane.

Per call, as over HTTP: a request context (id from `x-request-id` metadata, the gRPC
deadline as ours, capped by REQUEST_TIMEOUT_SECONDS), admission at the door (asked here
and nowhere else for gRPC), the API key from `authorization` metadata, the same data
plane (decode, batcher, encode), and one metrics sample and access line labelled with
the RPC. Errors are gRPC status codes (service/errors.py names each) with the same
messages as REST; RESOURCE_EXHAUSTED carries `retry-after` trailing metadata.

The methods are registered by hand (`handler`) rather than through the generated
servicer, for two reasons: a message that is not valid protobuf is answered
INVALID_ARGUMENT by our own code, counted and logged like any other refusal (grpcio's
generated deserializer raises, and grpcio answers UNKNOWN with nothing logged), and
ModelInfer's answer is the data plane's encoding (service/codec.py `encode_message`),
bytes that go out as they are. The request id comes back in the trailing metadata, sent
with the status: a separate send of initial metadata cost every call a batch of its own
in gRPC's core (`python -m bench floor` measured it).
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from contract.modelcard import IMAGE_SIZE, INPUT_NAME
from service.auth import check
from service.codec import FILES_NAME, VALUES_PER_IMAGE
from service.context import Operation, RequestContext, request_id
from service.dataplane import EXTENSIONS, PLATFORM, SERVER_NAME, SERVER_VERSION, DataPlane
from service.errors import ContractError, InvalidTensor, message_of, quoted, status_of
from service.outputs import encode_message
from service.rpc import inference_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = "inference.GRPCInferenceService"
SERVICE = f"/{SERVICE_NAME}/"
REQUEST_ID = "x-request-id"
ROLLOUT_KEY = "x-rollout-key"  # who the caller is for a canary (service/rollout.py)
AUTHORIZATION = "authorization"
# The request's fields the codec validates are taken up to one past their limit: enough
# for its message, and no work for a message holding thousands of them.
MAX_INPUTS, MAX_OUTPUTS, MAX_PARAMETERS = 2, 9, 17


class Undecodable(NamedTuple):
    """What the deserializer hands on for bytes that are not the RPC's message."""

    message: str


def decoder(kind: type[Message]) -> Callable[[bytes], Any]:
    """The request deserializer of an RPC: its message, or `Undecodable` (never raises:
    an exception here would be grpcio's UNKNOWN, answered before any of our code runs)."""
    name = kind.DESCRIPTOR.full_name

    def decode(data: bytes) -> Message | Undecodable:
        try:
            return kind.FromString(data)
        except (DecodeError, ValueError, RuntimeError):
            return Undecodable(f"the message is not a valid {name} (protobuf could not parse it)")

    return decode


class Servicer:
    def __init__(self, plane: DataPlane, keys: frozenset[bytes]) -> None:
        self.plane, self.keys = plane, keys
        self.door = plane.door
        self.timeout = plane.settings.request_timeout_seconds
        self.max_values = plane.settings.max_images_per_request * VALUES_PER_IMAGE
        self.operations = {}  # RPC name -> Operation, built once
        for rpc in ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady",
                    "ModelMetadata", "ModelConfig", "ModelInfer"):  # fmt: skip
            inference = rpc == "ModelInfer"
            self.operations[rpc] = Operation(SERVICE + rpc, inference=inference, v2=True)
        self.door.expect([self.operations["ModelInfer"].name])

    def handler(self) -> grpc.GenericRpcHandler:
        """Every RPC, with its deserializer (`decoder`) and serializer."""
        rpcs: dict[str, tuple[Callable, type[Message], bool]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, False),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, False),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, False),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, True),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, True),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest, True),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, True),
        }
        methods = {}
        for rpc, (work, kind, protected) in rpcs.items():
            methods[rpc] = grpc.unary_unary_rpc_method_handler(
                self._method(self.operations[rpc], work, protected),
                request_deserializer=decoder(kind),
                # ModelInfer answers bytes already encoded; the others a message.
                response_serializer=None if rpc == "ModelInfer" else _serialize,
            )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    # --- health and metadata -------------------------------------------------------------

    async def server_live(self, request, ctx: RequestContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, ctx: RequestContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.not_ready_reason() is None)

    async def server_metadata(self, request, ctx: RequestContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=EXTENSIONS)  # fmt: skip

    async def model_ready(self, request, ctx: RequestContext) -> pb.ModelReadyResponse:
        served = self.plane.loaded().get(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=served.ready)

    async def model_metadata(self, request, ctx: RequestContext) -> pb.ModelMetadataResponse:
        found = self.plane.model_metadata(request.name, request.version or None)
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=found["name"], versions=found["versions"], platform=found["platform"],
            inputs=[tensors(**t) for t in found["inputs"]],
            outputs=[tensors(**t) for t in found["outputs"]],
        )  # fmt: skip

    async def model_config(self, request, ctx: RequestContext) -> pb.ModelConfigResponse:
        """Triton's model configuration, enough for perf_analyzer: the batch dimension is
        implicit (max_batch_size: MAX_IMAGES_PER_REQUEST), dims are per image."""
        found = self.plane.model_metadata(request.name, request.version or None)
        return pb.ModelConfigResponse(config=pb.ModelConfig(
            name=found["name"], platform=PLATFORM, backend="onnxruntime",
            max_batch_size=self.plane.settings.max_images_per_request,
            # Both optional: a request carries pixels or encoded images (one of the two).
            input=[pb.ModelInput(name=INPUT_NAME, data_type=pb.TYPE_UINT8,
                                 dims=[IMAGE_SIZE, IMAGE_SIZE, 3], optional=True),
                   pb.ModelInput(name=FILES_NAME, data_type=pb.TYPE_STRING, dims=[1],
                                 optional=True)],
            output=[pb.ModelOutput(name=t["name"], data_type=pb.TYPE_FP32,
                                   dims=t["shape"][1:]) for t in found["outputs"]],
        ))  # fmt: skip

    # --- inference -----------------------------------------------------------------------

    async def model_infer(self, request: pb.ModelInferRequest, ctx: RequestContext) -> bytes:
        plane = self.plane
        version = request.model_version or None
        plane.model(ctx, request.model_name, version)  # NOT_FOUND before decoding
        fields, raw, elements = fields_of(request, self.max_values)
        decoded = await plane.decode_fields(fields, raw, elements)
        answer = await plane.infer_tensors(ctx, request.model_name, version, decoded)
        return encode_message(answer)

    # --- what every call shares ----------------------------------------------------------

    def _method(
        self,
        operation: Operation,
        work: Callable[[Any, RequestContext], Awaitable[T]],
        protected: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[T]]:
        """An RPC's behaviour: the door, the key, the deadline, `work`, then the status
        (an error's, with its message), one metrics sample and one access line."""
        plane, door, admission = self.plane, self.door, self.plane.admission
        metrics, timeout = plane.metrics, self.timeout
        keys = self.keys if protected else None

        async def call(request: Any, context: grpc.aio.ServicerContext) -> T:
            start = time.perf_counter()
            sent_id, credentials, rollout_key = None, "", ""
            for key, value in context.invocation_metadata() or ():
                if key == REQUEST_ID and isinstance(value, str):
                    sent_id = value
                elif key == AUTHORIZATION and isinstance(value, str):
                    credentials = value
                elif key == ROLLOUT_KEY and isinstance(value, str):
                    rollout_key = value
            ctx = RequestContext(request_id(sent_id), operation, time.monotonic(),
                                 credentials=credentials, rollout_key=rollout_key)  # fmt: skip
            trailers: tuple[tuple[str, str], ...] = ((REQUEST_ID, ctx.request_id),)
            status, entered = "OK", False
            try:
                if (refused := door.refuse(ctx)) is not None:
                    raise refused
                if isinstance(request, Undecodable):
                    raise InvalidTensor(request.message)
                if keys:
                    check(credentials, keys, "an API key")
                if operation.inference:
                    admission.enter()  # the message is in: it now waits for the model
                    entered = True
                remaining = context.time_remaining()
                seconds = timeout if remaining is None else min(timeout, max(remaining, 0.0))
                ctx.start_deadline(asyncio.get_running_loop().time(), seconds)
                answer = await work(request, ctx)
                context.set_trailing_metadata(trailers)
                return answer
            except ContractError as err:
                found = status_of(err)
                status = found.grpc
                if found.headers and "Retry-After" in found.headers:
                    trailers += (("retry-after", found.headers["Retry-After"]),)
                context.set_trailing_metadata(trailers)
                await context.abort(grpc.StatusCode[status], message_of(err))
            except asyncio.CancelledError:
                status = "CANCELLED"  # the client cancelled or left; grpc has dropped the call
                raise
            except grpc.aio.AbortError:
                raise
            except Exception:
                status = "INTERNAL"
                log.exception("unexpected error", extra={"rpc": operation.name})
                context.set_trailing_metadata(trailers)
                await context.abort(grpc.StatusCode.INTERNAL,
                                    "internal server error; the log has the detail")  # fmt: skip
            finally:
                if entered:
                    admission.leave()
                metrics.finish(ctx, operation.name, "POST", status, time.perf_counter() - start)
            raise AssertionError("unreachable: abort raises")

        return call


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def fields_of(
    request: pb.ModelInferRequest, max_values: int
) -> tuple[dict[str, Any], bytes | None, list[bytes] | None]:
    """The request as the fields the codec validates (service/codec.py), its one input's
    raw bytes if it came so, and its BYTES elements if it came in `bytes_contents`.
    Repeated fields are cut one past the codec's limit, so a message of thousands of
    inputs costs no more than one of two; typed values beyond `max_values` are refused
    before they become Python objects."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidTensor(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for "
            f"{len(request.inputs)} inputs; one per input, in order"
        )
    inputs, elements = [], None
    for tensor in itertools.islice(request.inputs, MAX_INPUTS):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}  # fmt: skip
        if tensor.parameters:
            entry["parameters"] = _parameters(tensor.parameters)
        if tensor.HasField("contents"):
            contents = tensor.contents
            if contents.bytes_contents:
                elements = list(contents.bytes_contents)
            elif len(contents.uint_contents) > max_values:
                raise InvalidTensor(f"input {quoted(tensor.name)}: {len(contents.uint_contents):,} "
                                    f"values, above any request's {max_values:,}")  # fmt: skip
            elif contents.uint_contents:
                entry["data"] = list(contents.uint_contents)
            elif any(contents.ListFields()):
                raise InvalidTensor(
                    f"input {quoted(tensor.name)}: UINT8 values go in uint_contents or "
                    f"raw_input_contents, encoded images ({FILES_NAME!r}, BYTES) in "
                    "bytes_contents or raw_input_contents"
                )
        inputs.append(entry)
    fields: dict[str, Any] = {
        "id": request.id or None,
        "model_name": request.model_name or None,
        "model_version": request.model_version or None,
        "inputs": inputs,
    }
    if request.parameters:
        fields["parameters"] = _parameters(request.parameters)
    if request.outputs:
        fields["outputs"] = [
            _output(output) for output in itertools.islice(request.outputs, MAX_OUTPUTS)
        ]
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    return fields, raw, elements


def _output(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> dict[str, Any]:
    if output.parameters:
        return {"name": output.name, "parameters": _parameters(output.parameters)}
    return {"name": output.name}


def _parameters(parameters) -> dict[str, Any]:
    values = {}
    for name, parameter in itertools.islice(parameters.items(), MAX_PARAMETERS):
        choice = parameter.WhichOneof("parameter_choice")
        if choice is not None:
            values[name] = getattr(parameter, choice)
    return values
