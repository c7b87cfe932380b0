"""POST /predict: parse the upload, call the data plane, encode the answer.

Answered by `PredictApp`, a bare ASGI app like /v2 infer's (service/routes/v2.py): the
query string validated by one pydantic model, the multipart body parsed by the library
FastAPI's forms use (python-multipart) straight into (filename, bytes) pairs for the
decoder every way in shares (service/decoding.py), and the answer written as JSON. No
Request, UploadFile or form objects; the errors and limits are the route's as FastAPI
answered them (a bad query parameter is FastAPI's 422 list, a malformed form a 400). The
signature of `predict` below is what OpenAPI documents (service/http/asgi.py
`DirectRoute`)."""

from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, File, Query, UploadFile
from pydantic import BaseModel, Field, ValidationError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from contract.modelcard import FAMILIARITY_NAME, OUTPUT_NAME
from service.dataplane import DataPlane
from service.decoding import read_images
from service.http.asgi import DirectRoute, documented_only, read_body, watch_disconnect
from service.http.door import context_of
from service.http.errors import error_answer, validation_answer
from service.schemas import DEFAULT_TOP_K, ErrorBody, PredictResponse, describe

router = APIRouter(tags=["predict"])

ERRORS = {
    400: {"model": ErrorBody, "description": "The body is not a readable multipart form"},
    401: {"model": ErrorBody, "description": "API_KEYS is set and no valid key was sent"},
    404: {"model": ErrorBody, "description": "Unknown model or version"},
    408: {"model": ErrorBody, "description": "The body did not arrive in time"},
    413: {
        "model": ErrorBody,
        "description": "Upload too large, too many images, or too many pixels",
    },
    422: {
        "description": "Not an image, truncated, empty, not 32x32, bad parameters, or "
        "below min_familiarity"
    },
    503: {
        "model": ErrorBody,
        "description": "No model loaded, shutting down, or overloaded (shed at once, with "
        "Retry-After)",
    },
    504: {"model": ErrorBody, "description": "Not answered before the request's deadline"},
}


FILES_DOC = "One or more 32x32 images: PNG, JPEG, BMP, GIF, WebP or TIFF"
FILE_DOC = "One image, as `curl -F file=@cat.png` sends it (beside or instead of `files`)"
MODEL_DOC = "Model id; default: DEFAULT_MODEL"
VERSION_DOC = "Version (content hash); default: the newest trained"
TOP_K_DOC = "Fine classes to return"
RESIZE_DOC = "Centre-crop to a square and resize to 32x32 instead of refusing"
MIN_FAMILIARITY_DOC = (
    "Refuse (422) images whose familiarity is below this: 0.01 refuses images stranger "
    "than 99 % of the validation set; default MIN_FAMILIARITY (0: off)"
)
# Swagger UI shows a file picker for `format: binary`, not for the OpenAPI 3.1
# `contentMediaType` FastAPI writes: without this, /docs could not upload.
BINARY = {"type": "string", "format": "binary"}
FIELDS = ("files", "file")  # the form fields that carry images; others are ignored


async def predict(
    files: Annotated[
        list[UploadFile], File(description=FILES_DOC, json_schema_extra={"items": BINARY})
    ] = (),  # optional: `file` may carry the one image instead
    file: Annotated[
        UploadFile | None,
        File(description=FILE_DOC, json_schema_extra=BINARY),
    ] = None,
    model: Annotated[str | None, Query(description=MODEL_DOC)] = None,
    version: Annotated[str | None, Query(description=VERSION_DOC)] = None,
    top_k: Annotated[int, Query(ge=1, le=100, description=TOP_K_DOC)] = DEFAULT_TOP_K,
    resize: Annotated[bool, Query(description=RESIZE_DOC)] = False,
    min_familiarity: Annotated[
        float | None, Query(ge=0, le=1, description=MIN_FAMILIARITY_DOC)
    ] = None,
) -> PredictResponse:
    """Classify images into the 100 CIFAR-100 classes and their 20 superclasses, each
    with its familiarity (how like the training data it is).

    Send at least one image: as `files` (one or more), or as `file` (one)."""
    documented_only()


router.add_api_route("/predict", predict, methods=["POST"], response_model=PredictResponse,
                     responses=ERRORS, route_class_override=DirectRoute)  # fmt: skip


class PredictQuery(BaseModel):
    """The query parameters, validated as FastAPI validated them (from strings)."""

    model: str | None = None
    version: str | None = None
    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=100)
    resize: bool = False
    min_familiarity: float | None = Field(None, ge=0, le=1)


class PredictApp:
    """POST /predict as a bare ASGI app (see the module's docstring)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = context_of(scope)
        watch_disconnect(context, receive)
        plane = self.plane
        try:
            try:
                sent = parse_qsl(scope["query_string"].decode("latin-1"))
                query = PredictQuery.model_validate(dict(sent))
            except ValidationError as err:
                return await validation_answer(err, "query")(scope, receive, send)
            plane.model(context, query.model, query.version)  # 404 before the body is read
            uploads = form_files(content_type(scope), await read_body(receive))
            images = await read_images(uploads, query.resize, plane.settings.max_images_per_request,
                                       plane.settings, plane.decode_slots)  # fmt: skip
            served, outputs, inference_ms = await plane.infer(
                context, query.model, query.version, images, min_familiarity=query.min_familiarity
            )
            familiarity = outputs.get(FAMILIARITY_NAME)
            content = PredictResponse(
                model_id=served.model_id,
                model_version=served.version,
                inference_ms=round(inference_ms, 3),
                predictions=[
                    describe(served.model, row, query.top_k, name,
                             None if familiarity is None else float(familiarity[i, 0]))
                    for i, (row, (name, _)) in enumerate(zip(outputs[OUTPUT_NAME], uploads,
                                                             strict=True))
                ],
            ).model_dump_json().encode()  # fmt: skip
        except Exception as exc:  # CancelledError (shutdown, a client gone) goes on up
            answer = error_answer(context.operation, exc, scope["path"])
            return await answer(scope, receive, send)
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(content)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def content_type(scope: Scope) -> bytes:
    return next((value for name, value in scope["headers"] if name == b"content-type"), b"")


def form_files(content_type: bytes, body: bytes) -> list[tuple[str | None, bytes]]:
    """The (filename, bytes) of each `files` and `file` part of a multipart form, in
    order; none for a body of another type (the decoder then asks for an image)."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        return []
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "Missing boundary in multipart.")
    parts: dict[str, list[tuple[str | None, bytes]]] = {field: [] for field in FIELDS}
    header, value = b"", b""
    name: bytes | None = None
    filename: str | None = None
    chunks: list[bytes] = []

    def on_part_begin() -> None:
        nonlocal name, filename, header, value
        name, filename, header, value = None, None, b"", b""
        chunks.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        nonlocal header
        header += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        nonlocal value
        value += data[start:end]

    def on_header_end() -> None:
        nonlocal name, filename, header, value
        if header.lower() == b"content-disposition":
            _, disposition = parse_options_header(value)
            name = disposition.get(b"name")
            sent = disposition.get(b"filename")
            filename = None if sent is None else sent.decode("utf-8", "replace")
        header, value = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunks.append(data[start:end])

    def on_part_end() -> None:
        if name is not None and (field := name.decode("latin-1")) in parts:
            parts[field].append((filename, b"".join(chunks)))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })  # fmt: skip
    try:
        parser.write(body)
        parser.finalize()
    except Exception as err:  # the library's MultipartParseError, and what it lets through
        raise HTTPException(400, f"There was an error parsing the body: {err}") from None
    # The one `file` (the last sent, as a form field's value is) first, then `files`.
    return parts["file"][-1:] + parts["files"]
