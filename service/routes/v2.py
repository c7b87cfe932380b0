"""The Open Inference Protocol (KServe v2, as Triton speaks it over REST): an adapter.

Health, server and model metadata, and inference with the JSON tensor format and the
binary tensor data extension (`Inference-Header-Content-Length`), so a client can send
raw uint8 tensors with no image decoding and no multipart parsing. The classification
extension answers "score:index:label" strings, as Triton does.

The data plane decodes, infers and encodes (as it does for gRPC, service/rpc/): these
routes only read the HTTP request and write the HTTP response. Errors are `{"error": "..."}`
(service/errors.py). Health answers carry the JSON bodies of KServe's V2 protocol
document (`{"live": true}`, `{"ready": true}`) with Triton's status codes, so both
tritonclient (status only) and KServe's client (the body) read them.
"""

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from service.codec import HEADER_LENGTH, InferenceRequest
from service.context import RequestContext
from service.dataplane import EXTENSIONS, SERVER_NAME, DataPlane
from service.errors import InvalidTensor, quoted
from service.http.asgi import DirectRoute, documented_only, read_body, watch_disconnect
from service.http.deps import CatalogDep, ContextDep, PlaneDep
from service.http.door import context_of
from service.http.errors import error_answer
from service.schemas import V2Error, V2Live, V2ModelMetadata, V2Ready, V2ServerMetadata

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])
health = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])  # open to probes

HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()  # as ASGI gives header names
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": V2Error, "description": "Bad tensor, shape, datatype or request"},
    401: {"model": V2Error, "description": "API_KEYS is set and no valid key was sent"},
    404: {"model": V2Error, "description": "Unknown model or version"},
    413: {"model": V2Error, "description": "Too many images or too many bytes"},
    422: {"model": V2Error, "description": "An image below min_familiarity"},
    503: {"model": V2Error, "description": "Not ready, shutting down, or overloaded"},
    504: {"model": V2Error, "description": "Not answered before the request's deadline"},
}
FALSE = {"model": V2Ready, "description": "not ready (the protocol: any 4xx is false)"}


def _ready(ready: bool) -> JSONResponse:
    # The protocol: 200 is true, any 4xx is false.
    return JSONResponse({"ready": ready}, status_code=200 if ready else 400)


@health.get("", response_model=V2ServerMetadata)
def server_metadata(request: Request) -> V2ServerMetadata:
    """Server name, version and the protocol extensions it supports."""
    return V2ServerMetadata(
        name=SERVER_NAME, version=request.app.version, extensions=list(EXTENSIONS)
    )


@health.get("/health/live", response_model=V2Live)
def server_live() -> V2Live:
    """200 while the process answers."""
    return V2Live(live=True)


@health.get("/health/ready", response_model=V2Ready, responses={400: FALSE})
def server_ready(plane: PlaneDep) -> JSONResponse:
    """200 when a model can take requests; 400 (the protocol's "false") otherwise."""
    return _ready(plane.not_ready_reason() is None)


INFER_OK = {
    "description": "The outputs: JSON, or JSON then raw bytes when an output is binary",
    "content": {"application/json": {}, "application/octet-stream": {}},
}


def infer_doc(*path: str) -> dict[str, Any]:
    """The inference route's OpenAPI entry: parameters written out (the route reads them
    by hand) and both body forms."""
    return {
        "parameters": [
            *(
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in path
            ),
            {
                "name": HEADER_LENGTH,
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "binary tensor data extension: bytes of JSON before the tensors",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": InferenceRequest.model_json_schema()},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"binary tensor data extension: a JSON header of "
                    f"`{HEADER_LENGTH}` bytes, then each binary input's raw bytes in order",
                },
            },
        },
    }


async def model_infer() -> Response:
    """Classify a uint8 tensor `images` [N, 32, 32, 3], or encoded images `image_files`
    BYTES [N]: `probabilities` FP32 [N, 100], and `features` or `familiarity` [N, 1] when
    asked (`parameters.min_familiarity` refuses images below it). JSON data (flat or
    nested; base64 strings for BYTES) or binary tensor data; outputs in binary with
    `"binary_data": true`; `"classification": k` for the top-k labels."""
    documented_only()  # answered by InferApp; its parameters are written out (infer_doc)


for _path, _params in (("/models/{model_name}/versions/{model_version}/infer",
                        ("model_name", "model_version")),
                       ("/models/{model_name}/infer", ("model_name",))):  # fmt: skip
    router.add_api_route(
        _path, model_infer, methods=["POST"], responses={**ERRORS, 200: INFER_OK},
        openapi_extra=infer_doc(*_params), route_class_override=DirectRoute,
    )  # fmt: skip


async def infer(
    plane: DataPlane,
    context: RequestContext,
    path_params: dict[str, str],
    header_length: str | None,
    body: Callable[[], Awaitable[bytes]],
) -> tuple[bytes, int | None]:
    """One inference request, from what either way in has read of it: the answer's body,
    and the length of its JSON part when binary outputs follow."""
    model_name, model_version = path_params["model_name"], path_params.get("model_version")
    plane.model(context, model_name, model_version)  # 404 before the body is read
    decoded = await plane.decode(await body(), header_length_of(header_length))
    answer = await plane.infer_tensors(context, model_name, model_version, decoded)
    return plane.encode(answer)


def answer_headers(content: bytes, head: int | None) -> list[tuple[bytes, bytes]]:
    """An inference answer's headers: JSON, or JSON then raw bytes (binary outputs)."""
    length = (b"content-length", str(len(content)).encode())
    if head is None:
        return [(b"content-type", b"application/json"), length]
    return [(b"content-type", b"application/octet-stream"), length,
            (HEADER_LENGTH_KEY, str(head).encode())]  # fmt: skip


class InferApp:
    """The inference route as a bare ASGI app: no Request, no Response object, no router,
    no FastAPI or Starlette middleware. The HTTP middleware calls it directly once its own
    checks are done (service/http/middleware.py: the app's DirectRoutes); each layer it
    skips costs every request a call per message
    (`python -m bench floor` measures the service against bare ASGI, Starlette and
    FastAPI apps). Errors are answered as the app's handlers answer them."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = context_of(scope)
        watch_disconnect(context, receive)
        sent = next((v.decode("latin-1") for k, v in scope["headers"] if k == HEADER_LENGTH_KEY),
                    None)  # fmt: skip
        try:
            content, head = await infer(self.plane, context, scope["path_params"], sent,
                                        lambda: read_body(receive))  # fmt: skip
        except Exception as exc:  # CancelledError (shutdown, a client gone) goes on up
            answer = error_answer(context.operation, exc, scope["path"])
            return await answer(scope, receive, send)
        headers = answer_headers(content, head)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def header_length_of(value: str | None) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):  # no sign, no spaces, no other numerals
        raise InvalidTensor(f"{HEADER_LENGTH} must be a non-negative integer, got {quoted(value)}")
    return int(value)


@router.post(
    "/models/{model_name}/explain",
    responses={**ERRORS, 200: INFER_OK},
    openapi_extra=infer_doc("model_name"),
)
@router.post(
    "/models/{model_name}/versions/{model_version}/explain",
    responses={**ERRORS, 200: INFER_OK},
    openapi_extra=infer_doc("model_name", "model_version"),
)
async def model_explain(
    request: Request,
    model_name: str,
    plane: PlaneDep,
    context: ContextDep,
    model_version: str | None = None,
) -> Response:
    """What the model looked at: the occlusion heat map (as `POST /explain`) of one image
    sent as an inference request (`images` [1, 32, 32, 3], JSON or binary), for its top
    class or `"parameters": {"class": k}`. Outputs `heat_map` FP32 [1, 32, 32], `class`
    INT32 [1] and `probability` FP32 [1]. An extension of this server, not of the
    protocol: one explanation is 50 images of work, counted as such in every bound."""
    plane.model(context, model_name, model_version)  # 404 before the body is read
    body = await request.body()
    length = header_length_of(request.headers.get(HEADER_LENGTH))
    decoded = await plane.decode(body, length, max_images=1)
    answer = await plane.explain_tensors(context, model_name, model_version, decoded)
    content, _ = plane.encode(answer)  # JSON only
    return Response(content, media_type="application/json")


@router.get("/models/{model_name}", response_model=V2ModelMetadata, responses=ERRORS)
@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=V2ModelMetadata,
    responses=ERRORS,
)
def model_metadata(
    model_name: str, plane: PlaneDep, model_version: str | None = None
) -> V2ModelMetadata:
    """Platform, versions, and every input and output with its datatype and shape
    (-1: the batch dimension)."""
    return V2ModelMetadata(**plane.model_metadata(model_name, model_version))


@router.get("/models/{model_name}/ready", response_model=V2Ready,
            responses={**ERRORS, 400: FALSE})  # fmt: skip
@router.get("/models/{model_name}/versions/{model_version}/ready", response_model=V2Ready,
            responses={**ERRORS, 400: FALSE})  # fmt: skip
def model_ready(
    model_name: str, catalog: CatalogDep, model_version: str | None = None
) -> JSONResponse:
    """200 when the model can take requests; 400 otherwise; 404 if it is not served."""
    return _ready(catalog.get(model_name, model_version).ready)
