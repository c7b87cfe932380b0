"""Each RPC of `inference.GRPCInferenceService` as a call on the data plane.

Per call, as over HTTP: a request context (id from `x-request-id` metadata, the gRPC
deadline as ours, capped by REQUEST_TIMEOUT_SECONDS), admission at the door, the API
key from `authorization` metadata, the same data plane (decode, batcher, encode), and
one metrics sample and access line labelled with the RPC. Errors are gRPC status codes
(service/errors.py names each) with the same messages as REST; RESOURCE_EXHAUSTED
carries `retry-after` trailing metadata.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from contract.modelcard import IMAGE_SIZE, INPUT_NAME
from service.auth import check
from service.context import Operation, RequestContext, request_id
from service.dataplane import EXTENSIONS, PLATFORM, SERVER_NAME, SERVER_VERSION, DataPlane
from service.errors import ContractError, InvalidTensor, status_of
from service.rpc import inference_pb2 as pb
from service.rpc.inference_pb2_grpc import GRPCInferenceServiceServicer

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE = "/inference.GRPCInferenceService/"
INFER = Operation(SERVICE + "ModelInfer", inference=True, v2=True)
REQUEST_ID = "x-request-id"
# The request's fields the codec validates are taken up to one past their limit: enough
# for its message, and no work for a message holding thousands of them.
MAX_INPUTS, MAX_OUTPUTS, MAX_PARAMETERS = 2, 9, 17


class Servicer(GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, keys: frozenset[bytes]) -> None:
        self.plane, self.keys = plane, keys
        plane.door.expect([INFER.name])

    # --- health and metadata -------------------------------------------------------------

    async def ServerLive(self, request, context):
        return await self._call(context, "ServerLive", False, lambda _: _live())

    async def ServerReady(self, request, context):
        ready = self.plane.not_ready_reason() is None
        return await self._call(context, "ServerReady", False,
                                lambda _: _done(pb.ServerReadyResponse(ready=ready)))  # fmt: skip

    async def ServerMetadata(self, request, context):
        answer = pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                           extensions=EXTENSIONS)  # fmt: skip
        return await self._call(context, "ServerMetadata", False, lambda _: _done(answer))

    async def ModelReady(self, request, context):
        async def ready(_: RequestContext) -> pb.ModelReadyResponse:
            served = self.plane.loaded().get(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=served.ready)

        return await self._call(context, "ModelReady", True, ready)

    async def ModelMetadata(self, request, context):
        async def metadata(_: RequestContext) -> pb.ModelMetadataResponse:
            found = self.plane.model_metadata(request.name, request.version or None)
            tensors = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=found["name"], versions=found["versions"], platform=found["platform"],
                inputs=[tensors(**t) for t in found["inputs"]],
                outputs=[tensors(**t) for t in found["outputs"]],
            )  # fmt: skip

        return await self._call(context, "ModelMetadata", True, metadata)

    async def ModelConfig(self, request, context):
        """Triton's model configuration, enough for perf_analyzer: the batch dimension is
        implicit (max_batch_size: MAX_IMAGES_PER_REQUEST), dims are per image."""

        async def config(_: RequestContext) -> pb.ModelConfigResponse:
            found = self.plane.model_metadata(request.name, request.version or None)
            return pb.ModelConfigResponse(config=pb.ModelConfig(
                name=found["name"], platform=PLATFORM, backend="onnxruntime",
                max_batch_size=self.plane.settings.max_images_per_request,
                input=[pb.ModelInput(name=INPUT_NAME, data_type=pb.TYPE_UINT8,
                                     dims=[IMAGE_SIZE, IMAGE_SIZE, 3])],
                output=[pb.ModelOutput(name=t["name"], data_type=pb.TYPE_FP32,
                                       dims=t["shape"][1:]) for t in found["outputs"]],
            ))  # fmt: skip

        return await self._call(context, "ModelConfig", True, config)

    # --- inference -----------------------------------------------------------------------

    async def ModelInfer(self, request, context):
        plane = self.plane

        async def infer(ctx: RequestContext) -> pb.ModelInferResponse:
            version = request.model_version or None
            plane.model(ctx, request.model_name, version)  # NOT_FOUND before decoding
            fields, raw = fields_of(request)
            decoded = plane.decode_fields(fields, raw)
            answer = await plane.infer_tensors(ctx, request.model_name, version, decoded)
            response = pb.ModelInferResponse(model_name=answer.model_name,
                                             model_version=answer.model_version,
                                             id=answer.id or "")  # fmt: skip
            for tensor in answer.outputs:
                response.outputs.add(name=tensor.name, datatype=tensor.datatype,
                                     shape=tensor.values.shape)  # fmt: skip
                response.raw_output_contents.append(tensor.raw())
            return response

        return await self._call(context, "ModelInfer", True, infer, INFER)

    # --- what every call shares ----------------------------------------------------------

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        rpc: str,
        protected: bool,
        work: Callable[[RequestContext], Awaitable[T]],
        operation: Operation | None = None,
    ) -> T:
        start = time.perf_counter()
        operation = operation or Operation(SERVICE + rpc, v2=True)
        metadata = {key: value for key, value in context.invocation_metadata() or ()
                    if isinstance(value, str)}  # fmt: skip
        ctx = RequestContext(
            request_id(metadata.get(REQUEST_ID)),
            operation,
            time.monotonic(),
            credentials=metadata.get("authorization", ""),
        )
        status, entered = "OK", False
        admission = self.plane.admission
        try:
            if (refused := self.plane.door.refuse(ctx)) is not None:
                raise refused
            if protected and self.keys:
                check(ctx.credentials, self.keys, "an API key")
            if operation.inference:
                admission.enter()  # the message is in: it now waits for the model
                entered = True
            loop = asyncio.get_running_loop()
            remaining = context.time_remaining()
            timeout = self.plane.settings.request_timeout_seconds
            ctx.start_deadline(loop.time(), timeout if remaining is None
                               else min(timeout, max(remaining, 0.0)))  # fmt: skip
            await context.send_initial_metadata(((REQUEST_ID, ctx.request_id),))
            return await work(ctx)
        except ContractError as err:
            answer = status_of(err)
            status = answer.grpc
            if answer.headers and "Retry-After" in answer.headers:
                context.set_trailing_metadata((("retry-after", answer.headers["Retry-After"]),))
            await context.abort(grpc.StatusCode[status], err.message)
        except asyncio.CancelledError:
            status = "CANCELLED"  # the client cancelled or left; grpc has dropped the call
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            status = "INTERNAL"
            log.exception("unexpected error", extra={"rpc": rpc})
            await context.abort(grpc.StatusCode.INTERNAL,
                                "internal server error; the log has the detail")  # fmt: skip
        finally:
            if entered:
                admission.leave()
            self.plane.metrics.finish(ctx, operation.name, "POST", status,
                                      time.perf_counter() - start)  # fmt: skip
        raise AssertionError("unreachable: abort raises")


def fields_of(request: pb.ModelInferRequest) -> tuple[dict[str, Any], bytes | None]:
    """The request as the fields the codec validates (service/codec.py), and its one
    input's raw bytes if it came so. Repeated fields are cut one past the codec's limit,
    so a message of thousands of inputs costs no more than one of two."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidTensor(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for "
            f"{len(request.inputs)} inputs; one per input, in order"
        )
    inputs = []
    for tensor in itertools.islice(request.inputs, MAX_INPUTS):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}  # fmt: skip
        if tensor.parameters:
            entry["parameters"] = _parameters(tensor.parameters)
        if tensor.HasField("contents"):
            contents = tensor.contents
            if any(contents.ListFields()) and not contents.uint_contents:
                raise InvalidTensor(
                    f"input {tensor.name!r}: UINT8 values go in uint_contents or raw_input_contents"
                )
            if contents.uint_contents:
                entry["data"] = list(contents.uint_contents)
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
    return fields, raw


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


async def _live() -> pb.ServerLiveResponse:
    return pb.ServerLiveResponse(live=True)


async def _done(answer: T) -> T:
    return answer
