"""The Open Inference Protocol (KServe v2, as Triton speaks it over REST).

Health, server and model metadata, and inference with the JSON tensor format and the
binary tensor data extension (`Inference-Header-Content-Length`), so a client can send
raw uint8 tensors with no image decoding and no multipart parsing. The classification
extension answers "score:index:label" strings, as Triton does.

Decoding and encoding live here; the tensor goes through the same `infer` as /predict
(batcher, queue bound, deadline). Errors are `{"error": "..."}` (service/errors.py).
"""

import json
import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse

from service.catalog import Catalog, Served
from service.deps import CatalogDep, InferenceDep
from service.errors import InvalidTensor, TooManyImages
from service.modelcard import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME
from service.schemas import V2Error, V2InferenceRequest, V2ModelMetadata, V2ServerMetadata

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
health = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])  # open to probes

SERVER_NAME = "cifar100-classifier"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "Inference-Header-Content-Length"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2Error, "description": "Bad tensor, shape, datatype or request"},
    401: {"model": V2Error, "description": "API_KEYS is set and no valid key was sent"},
    404: {"model": V2Error, "description": "Unknown model or version"},
    413: {"model": V2Error, "description": "Too many images or too many bytes"},
    503: {"model": V2Error, "description": "Not ready, shutting down, or overloaded"},
    504: {"model": V2Error, "description": "Not answered before the request's deadline"},
}
NOT_READY = Response(status_code=400)  # the protocol: 200 is true, any 4xx is false


@health.get("", response_model=V2ServerMetadata)
def server_metadata(request: Request) -> V2ServerMetadata:
    """Server name, version and the protocol extensions it supports."""
    return V2ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


EMPTY = {"description": "true (empty body)"}
FALSE = {"description": "false (empty body)"}


@health.get("/health/live", response_class=Response, responses={200: EMPTY})
def server_live() -> Response:
    """200 while the process answers."""
    return Response(status_code=200)


@health.get("/health/ready", response_class=Response, responses={200: EMPTY, 400: FALSE})
def server_ready(request: Request, catalog: CatalogDep) -> Response:
    """200 when a model can take requests; 400 (the protocol's "false") otherwise."""
    ready = catalog.ready and not request.app.state.draining.is_set()
    return Response(status_code=200) if ready else NOT_READY


INFER_OK = {
    "description": "The outputs: JSON, or JSON then raw bytes when an output is binary",
    "content": {"application/json": {}, "application/octet-stream": {}},
}
INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": V2InferenceRequest.model_json_schema()},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"binary tensor data extension: a JSON header of "
                f"`{HEADER_LENGTH}` bytes, then each binary input's raw bytes in order",
            },
        },
    }
}


# Inference first: routes are matched in order, and this one carries the load.
@router.post(
    "/models/{model_name}/infer", responses={**ERRORS, 200: INFER_OK}, openapi_extra=INFER_DOC
)
@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    responses={**ERRORS, 200: INFER_OK},
    openapi_extra=INFER_DOC,
)
async def model_infer(
    request: Request,
    model_name: str,
    inference: InferenceDep,
    header_length: Annotated[int | None, Header(alias=HEADER_LENGTH, ge=0)] = None,
    model_version: str | None = None,
) -> Response:
    """Classify a uint8 tensor `images` [N, 32, 32, 3]: `probabilities` FP32 [N, 100],
    and `features` when asked. JSON data (flat or nested) or binary tensor data; outputs
    in binary with `"binary_data": true`; `"classification": k` for the top-k labels."""
    inference.model(model_name, model_version)  # unknown: 404 before the body is read
    body = await request.body()  # the app's body limit applies while it streams in
    header, binary = _split(body, header_length)
    images = _input_tensor(header, binary, inference.settings.max_images_per_request)
    served, outputs, _ = await inference.run(model_name, model_version, images)
    return _encode(served, header, outputs)


@router.get("/models/{model_name}", response_model=V2ModelMetadata, responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=V2ModelMetadata,
    responses=ERRORS,
)
def model_metadata(
    model_name: str, catalog: CatalogDep, model_version: str | None = None
) -> V2ModelMetadata:
    """Platform, versions, and every input and output with its datatype and shape
    (-1: the batch dimension)."""
    model = _model(catalog, model_name, model_version).model
    return V2ModelMetadata(
        name=model.model_id,
        versions=sorted(catalog.models[model.model_id]),
        platform="onnxruntime_onnx",
        inputs=[{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
        outputs=[
            {"name": name, "datatype": "FP32", "shape": [-1, width]}
            for name, width in model.output_widths.items()
        ],
    )


@router.get(
    "/models/{model_name}/ready",
    response_class=Response,
    responses={**ERRORS, 200: EMPTY, 400: FALSE},
)
@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_class=Response,
    responses={**ERRORS, 200: EMPTY, 400: FALSE},
)
def model_ready(model_name: str, catalog: CatalogDep, model_version: str | None = None) -> Response:
    """200 when the model can take requests; 400 otherwise; 404 if it is not served."""
    ready = _model(catalog, model_name, model_version).ready
    return Response(status_code=200) if ready else NOT_READY


def _model(catalog: Catalog, name: str, version: str | None) -> Served:
    return catalog.get(name, version)


def _split(body: bytes, header_length: int | None) -> tuple[dict, memoryview]:
    """The JSON header and what follows it (binary tensor data)."""
    if header_length is None:
        header_length = len(body)
    if header_length > len(body):
        raise InvalidTensor(
            f"{HEADER_LENGTH} is {header_length}, but the body has {len(body)} bytes"
        )
    try:
        header = json.loads(body[:header_length])
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidTensor(f"the inference request is not valid JSON ({err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InvalidTensor("the inference request must be a JSON object with an 'inputs' list")
    return header, memoryview(body)[header_length:]


def _input_tensor(header: dict, binary: memoryview, max_images: int) -> np.ndarray:
    inputs = header["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict) or inputs[0].get("name") != INPUT_NAME:
        names = [i.get("name") if isinstance(i, dict) else i for i in inputs]
        raise InvalidTensor(f"expected one input named {INPUT_NAME!r}, got {names}")
    tensor = inputs[0]
    shape, datatype = tensor.get("shape"), tensor.get("datatype")
    if datatype != "UINT8":
        raise InvalidTensor(f"input {INPUT_NAME!r} must have datatype UINT8, got {datatype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[0] < 1
        or shape[1:] != [IMAGE_SIZE, IMAGE_SIZE, 3]
    ):
        raise InvalidTensor(f"input {INPUT_NAME!r} must have shape [N, 32, 32, 3], got {shape}")
    if shape[0] > max_images:
        raise TooManyImages(f"{shape[0]} images in one request; at most {max_images}")
    count = math.prod(shape)
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if size != count or len(binary) != size:
            raise InvalidTensor(
                f"binary_data_size is {size} and {len(binary)} bytes follow the header; "
                f"shape {shape} of UINT8 needs {count}"
            )
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    if len(binary):
        raise InvalidTensor("binary data follows the header but no input has binary_data_size")
    return _from_json(tensor.get("data"), shape, count)


def _from_json(data: Any, shape: list[int], count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidTensor(f"input {INPUT_NAME!r} needs 'data' (a list) or binary data")
    try:
        values = np.asarray(data, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise InvalidTensor(f"input {INPUT_NAME!r}: data must hold integers only") from None
    if values.size != count:
        raise InvalidTensor(f"input {INPUT_NAME!r}: {values.size} values for shape {shape}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidTensor(f"input {INPUT_NAME!r}: UINT8 values must be within 0..255")
    return values.astype(np.uint8).reshape(shape)


def _encode(served: Served, header: dict, outputs: dict[str, np.ndarray]) -> Response:
    """The inference response; raw bytes after the JSON for outputs asked in binary."""
    parameters = header.get("parameters") if isinstance(header.get("parameters"), dict) else {}
    binary_default = bool(parameters.get("binary_data_output", False))
    asked = header.get("outputs")
    if asked is None:
        asked = [{"name": OUTPUT_NAME}]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise InvalidTensor("'outputs' must be a list of objects")
    described, blobs = [], []
    for request in asked:
        name = request.get("name")
        if name not in outputs:
            raise InvalidTensor(f"unknown output {name!r}; this model has {sorted(outputs)}")
        options = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
        values = outputs[name]
        datatype = "FP32"
        if "classification" in options:
            values = _classify(served.model.card.class_names, values, options["classification"])
            datatype = "BYTES"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if options.get("binary_data", binary_default):
            blob = _bytes_tensor(values) if datatype == "BYTES" else values.astype("<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.ravel().tolist()
        described.append(entry)
    body = {
        "model_name": served.model_id,
        "model_version": served.version,
        "outputs": described,
    }
    if "id" in header:
        body["id"] = header["id"]
    if not blobs:
        return JSONResponse(body)
    head = json.dumps(body, separators=(",", ":")).encode()
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def _classify(names: list[str], values: np.ndarray, k: Any) -> np.ndarray:
    """Triton's classification extension: the top k as "score:index:label"."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= values.shape[1]:
        raise InvalidTensor(f"classification must be an integer from 1 to {values.shape[1]}")
    if values.shape[1] != len(names):
        raise InvalidTensor("classification applies to the probabilities output only")
    best = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return np.array(
        [
            [f"{row[i]:.6f}:{i}:{names[i]}" for i in top]
            for row, top in zip(values, best, strict=True)
        ],
        dtype=object,
    )


def _bytes_tensor(values: np.ndarray) -> bytes:
    """BYTES in binary: each element as a 4-byte little-endian length, then its bytes."""
    parts = []
    for value in values.ravel():
        encoded = str(value).encode()
        parts.append(len(encoded).to_bytes(4, "little") + encoded)
    return b"".join(parts)
