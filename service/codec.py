"""The Open Inference Protocol's request codec: request bytes -> one uint8 tensor (or the
encoded images of a BYTES input). Knows nothing of HTTP, gRPC or of models: the JSON and
binary forms are here (the answer's side: service/outputs.py).

The request is validated by `InferenceRequest`, the same pydantic model the OpenAPI
document shows, parsed straight from the bytes by pydantic's JSON parser (which refuses
nesting deeper than 200, so a body of `[[[[...` is a 400, not a RecursionError). Parsing
refuses what it does not understand instead of casting it: `data` holds integers 0..255
only (no floats, booleans or strings), parameters are finite scalars, and an output may
be asked once. So every request's work and answer are bounded by its size: the answer
holds at most each output once per image.

Binary tensor data: `Inference-Header-Content-Length` bytes of JSON, then the raw
tensors; an output asked with `binary_data` comes back the same way.

Encoded images (PNG, JPEG, ... what /predict takes) come as the input `image_files`,
BYTES [N] (or [N, 1]): in JSON as base64 strings (as KServe's Python server reads BYTES
sent as text), in binary as each element's 4-byte little-endian length then its bytes
(Triton's framing, what tritonclient sends), over gRPC in `bytes_contents` or raw
contents framed the same way. The codec only unframes them; the data plane decodes them
with /predict's own code and limits.
"""

import base64
import binascii
import math
from typing import Annotated, Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from contract.modelcard import IMAGE_SIZE, INPUT_NAME, OUTPUT_NAME
from service.errors import InvalidTensor, TooManyImages, quoted

HEADER_LENGTH = "Inference-Header-Content-Length"
FILES_NAME = "image_files"  # the input of encoded images, BYTES [N]
MAX_HEADER_BYTES = 64 * 1024  # the JSON before binary data: names and parameters only
# Compact JSON spends at most 4 bytes on a value ("255,"); nesting adds about one more.
# Twice that leaves room for spaces and newlines: the largest valid JSON request.
JSON_BYTES_PER_VALUE = 10
VALUES_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE * 3

Byte = Annotated[StrictInt, Field(ge=0, le=255)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False, strict=True)]
Scalar = StrictBool | StrictInt | FiniteFloat | Annotated[str, Field(max_length=256)]
# Flat (the protocol's row-major form), or nested as the shape says; fail_fast: one bad
# value ends validation instead of collecting an error for each of 196,608 values.


def _list(item: Any) -> Any:
    # Never empty: `[[], [], ...]` would cost a list object per 3 bytes sent.
    return Annotated[list[item], Field(min_length=1, fail_fast=True)]


FlatData = _list(Byte)
NestedData = _list(_list(_list(_list(Byte))))
Texts = _list(StrictStr)  # BYTES in JSON: base64, one string an image


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Parameters(BaseModel):
    """The protocol lets clients send parameters of their own: up to 16 finite scalars are
    taken (and ignored); the ones this server knows are typed in each subclass."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Scalar] = Field(init=False)

    @model_validator(mode="after")
    def few(self) -> "Parameters":
        if len(self.__pydantic_extra__ or {}) > 16:
            raise ValueError("at most 16 parameters")
        return self


class TensorParameters(Parameters):
    binary_data_size: StrictInt | None = Field(None, ge=0)


class InputTensor(Strict):
    name: str = Field(
        max_length=64,
        description=f"`{INPUT_NAME}` (UINT8 pixels) or `{FILES_NAME}` (BYTES: encoded images)",
    )
    datatype: str = Field(max_length=16, description=f"UINT8 for `{INPUT_NAME}`, BYTES for "
                          f"`{FILES_NAME}`")  # fmt: skip
    shape: list[StrictInt] = Field(
        min_length=1, max_length=4, description=f"`{INPUT_NAME}`: [N, 32, 32, 3]; "
        f"`{FILES_NAME}`: [N] or [N, 1]", examples=[[1, 32, 32, 3]],
    )  # fmt: skip
    parameters: TensorParameters | None = None
    data: Annotated[FlatData | NestedData | Texts, Field(union_mode="left_to_right")] | None = (
        Field(None, description=f"`{INPUT_NAME}`: integers 0..255, flat (row-major) or nested "
              f"as `shape`; `{FILES_NAME}`: one base64 string per image; or "
              "`parameters.binary_data_size` with the bytes after the JSON")
    )  # fmt: skip

    @field_validator("shape")
    @classmethod
    def fits(cls, shape: list[int], info: ValidationInfo) -> list[int]:
        """The one input: its name, datatype and shape agree (a message each), checked
        before its data is (a data list is only read for a tensor that can hold it)."""
        name, datatype = info.data.get("name"), info.data.get("datatype")
        if name not in (INPUT_NAME, FILES_NAME):
            _refuse(f"expected one input named {INPUT_NAME!r} (UINT8 pixels) or "
                    f"{FILES_NAME!r} (BYTES, encoded images), got {quoted(str(name))}")  # fmt: skip
        files = name == FILES_NAME
        if datatype != ("BYTES" if files else "UINT8"):
            _refuse(f"input {name!r} must have datatype {'BYTES' if files else 'UINT8'}, "
                    f"got {quoted(str(datatype))}")  # fmt: skip
        if files and (shape[0] < 1 or shape[1:] not in ([], [1])):
            _refuse(f"input {FILES_NAME!r} must have shape [N] or [N, 1], got {shape}")
        if not files and (shape[0] < 1 or shape[1:] != [IMAGE_SIZE, IMAGE_SIZE, 3]):
            _refuse(f"input {INPUT_NAME!r} must have shape [N, 32, 32, 3], got {shape}")
        return shape

    @model_validator(mode="after")
    def data_fits(self) -> "InputTensor":
        texts = self.data is not None and isinstance(self.data[0], str)
        if self.data is not None and texts != (self.name == FILES_NAME):
            _refuse(f"input {FILES_NAME!r}: data must hold one base64 string per image"
                    if self.name == FILES_NAME else f"input {INPUT_NAME!r}: data must hold "
                    "integers only, flat or nested as the shape")  # fmt: skip
        return self


def _refuse(message: str) -> None:
    raise PydanticCustomError("tensor", message)


class OutputParameters(Parameters):
    binary_data: StrictBool | None = None
    classification: StrictInt | None = Field(
        None, ge=1, description='the top k as "score:index:label" strings'
    )


class RequestedOutput(Strict):
    name: str = Field(max_length=64, examples=[OUTPUT_NAME])
    parameters: OutputParameters | None = None


class RequestParameters(Parameters):
    binary_data_output: StrictBool = Field(False, description="every output in binary")
    resize: StrictBool = Field(
        False, description=f"`{FILES_NAME}`: centre-crop and resize images of another size "
        "to 32x32 instead of refusing them",
    )  # fmt: skip
    min_familiarity: FiniteFloat | None = Field(
        None, ge=0, le=1, description="refuse (422) images less familiar than this"
    )
    # /explain only: the class to explain (default: the top one).
    explain_class: StrictInt | None = Field(
        None, ge=0, alias="class", description="/explain: the class id to explain"
    )


class InferenceRequest(Strict):
    """The protocol's inference request, as this server takes it."""

    id: str | None = Field(None, max_length=256)
    # KServe's client names the model in the body too; the URL decides which answers.
    model_name: str | None = Field(None, max_length=64)
    model_version: str | None = Field(None, max_length=64)
    parameters: RequestParameters | None = None
    inputs: list[InputTensor] = Field(
        min_length=1, max_length=1, description=f"exactly one: `{INPUT_NAME}`, UINT8 "
        f"[N, 32, 32, 3], or `{FILES_NAME}`, BYTES [N] of encoded images",
    )  # fmt: skip
    outputs: list[RequestedOutput] | None = Field(
        None,
        max_length=8,
        description="`probabilities` (default), `features`, `familiarity`, each at most once; "
        '`parameters`: `{"binary_data": true}` or `{"classification": k}`',
    )


def max_message_bytes(max_images: int, max_upload_bytes: int = 0) -> int:
    """The largest gRPC inference message taken: each UINT8 value at most 2 bytes (a
    packed varint in `uint_contents`; 1 in `raw_input_contents`), names and parameters
    within MAX_HEADER_BYTES; and at least one encoded image of MAX_UPLOAD_BYTES (gRPC
    holds a whole message before any of our code sees it, so calls at once are bounded by
    this size: it cannot grow to a request of every image at its upload limit)."""
    tensors = max_images * VALUES_PER_IMAGE * 2
    return MAX_HEADER_BYTES + max(tensors, max_upload_bytes + 2 * FRAME)


def max_request_bytes(max_images: int) -> int:
    """The largest valid JSON inference request: every value spelt out (encoded images in
    base64 fit within it too: about 30 KB an image)."""
    return MAX_HEADER_BYTES + max_images * VALUES_PER_IMAGE * JSON_BYTES_PER_VALUE


def max_binary_request_bytes(max_images: int, max_files_bytes: int) -> int:
    """The largest valid request with binary data (Inference-Header-Content-Length): its
    JSON header, then the pixels of `max_images` images, or encoded images of at most
    `max_files_bytes` in all (/predict's bound) with their 4-byte lengths."""
    files = max_files_bytes + max_images * FRAME
    return MAX_HEADER_BYTES + max(max_images * VALUES_PER_IMAGE, files)


def parse_json(body: bytes | memoryview) -> InferenceRequest:
    """The request's JSON, validated; InvalidTensor (400) saying what is wrong."""
    try:
        return InferenceRequest.model_validate_json(body)
    except ValidationError as err:
        raise InvalidTensor(_problem(err)) from None


def parse_fields(fields: dict[str, Any]) -> InferenceRequest:
    """The same request from Python values (a transport that parsed its own message:
    gRPC), validated by the same model, refused in the same words."""
    try:
        return InferenceRequest.model_validate(fields)
    except ValidationError as err:
        raise InvalidTensor(_problem(err)) from None


Tensor = np.ndarray | list[bytes]  # uint8 pixels [N, 32, 32, 3], or N encoded images


def is_files(request: InferenceRequest) -> bool:
    return request.inputs[0].name == FILES_NAME


def _counted(request: InferenceRequest, max_images: int) -> int:
    """The values the one input's shape holds (images, for encoded ones); TooManyImages
    (413) above `max_images`."""
    shape = request.inputs[0].shape
    if shape[0] > max_images:
        raise TooManyImages(f"{shape[0]} images in one request; at most {max_images}")
    return math.prod(shape)


def decode_request(
    body: bytes, header_length: int | None, max_images: int
) -> tuple[InferenceRequest, Tensor]:
    """The validated request and its input (pixels uint8 [N, 32, 32, 3], or N encoded
    images); InvalidTensor (400) or TooManyImages (413) with a message that says what is
    wrong."""
    if header_length is None:
        header_length = len(body)
    elif header_length > min(len(body), MAX_HEADER_BYTES):
        raise InvalidTensor(
            f"{HEADER_LENGTH} is {header_length}; it must be at most the body's "
            f"{len(body)} bytes and {MAX_HEADER_BYTES:,}"
        )
    request = parse_json(body[:header_length])
    (tensor,) = request.inputs
    count = _counted(request, max_images)
    binary = memoryview(body)[header_length:]
    size = tensor.parameters.binary_data_size if tensor.parameters else None
    if size is not None:
        if tensor.data is not None:
            raise InvalidTensor(f"input {tensor.name!r} has both data and binary_data_size")
        if is_files(request):
            if len(binary) != size:
                raise InvalidTensor(f"binary_data_size is {size} and {len(binary)} bytes "
                                    "follow the header")  # fmt: skip
            return request, unframe(binary, count)
        if size != count or len(binary) != size:
            raise InvalidTensor(
                f"binary_data_size is {size} and {len(binary)} bytes follow the header; "
                f"shape {tensor.shape} of UINT8 needs {count}"
            )
        return request, np.frombuffer(binary, dtype=np.uint8).reshape(tensor.shape)
    if len(binary):
        raise InvalidTensor("binary data follows the header but no input has binary_data_size")
    return request, _values(request, count)


def decode_raw(
    request: InferenceRequest,
    raw: bytes | None,
    max_images: int,
    elements: list[bytes] | None = None,
) -> Tensor:
    """The input of a request whose values came apart from its fields (gRPC): as raw
    bytes (`raw_input_contents`), as BYTES elements (`bytes_contents`), or as `data`."""
    count = _counted(request, max_images)
    (tensor,) = request.inputs
    if (raw is not None) + (elements is not None) + (tensor.data is not None) > 1:
        raise InvalidTensor(f"input {tensor.name!r} has both contents and raw contents")
    if elements is not None:
        if not is_files(request):
            raise InvalidTensor(
                f"input {tensor.name!r}: UINT8 values go in uint_contents or raw_input_contents"
            )
        if len(elements) != count:
            raise InvalidTensor(f"input {FILES_NAME!r} has {len(elements)} elements for "
                                f"shape {tensor.shape}")  # fmt: skip
        return elements
    if raw is None:
        return _values(request, count)
    if is_files(request):
        return unframe(memoryview(raw), count)
    if len(raw) != count:
        raise InvalidTensor(
            f"input {INPUT_NAME!r} has {len(raw)} raw bytes; shape {tensor.shape} of UINT8 "
            f"needs {count}"
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(tensor.shape)


FRAME = 4  # bytes of each BYTES element's length


def unframe(data: memoryview, count: int) -> list[bytes]:
    """`count` BYTES elements, each a 4-byte little-endian length then its bytes, filling
    `data` exactly (Triton's binary form of BYTES)."""
    elements, at = [], 0
    while at < len(data) and len(elements) < count:
        if at + FRAME > len(data):
            break
        size = int.from_bytes(data[at : at + FRAME], "little")
        at += FRAME
        if at + size > len(data):
            raise InvalidTensor(f"input {FILES_NAME!r}: element {len(elements) + 1} says "
                                f"{size:,} bytes; {len(data) - at:,} are left")  # fmt: skip
        elements.append(bytes(data[at : at + size]))
        at += size
    if len(elements) != count or at != len(data):
        raise InvalidTensor(
            f"input {FILES_NAME!r}: the binary data must be {count} elements, each a 4-byte "
            f"little-endian length then its bytes; found {len(elements)} and "
            f"{len(data) - at:,} bytes more"
        )
    return elements


def _values(request: InferenceRequest, count: int) -> Tensor:
    """The input's `data`: values as uint8 in its shape, or base64 strings decoded."""
    (tensor,) = request.inputs
    shape = tensor.shape
    if tensor.data is None:
        raise InvalidTensor(f"input {tensor.name!r} needs 'data' or binary data")
    if is_files(request):
        if len(tensor.data) != count:
            raise InvalidTensor(f"input {FILES_NAME!r}: {len(tensor.data)} strings for "
                                f"shape {shape}")  # fmt: skip
        try:
            return [base64.b64decode(text, validate=True) for text in tensor.data]
        except (binascii.Error, ValueError):
            raise InvalidTensor(f"input {FILES_NAME!r}: data must be base64 strings (RFC 4648, "
                                "standard alphabet), one per image") from None  # fmt: skip
    try:
        values = np.asarray(tensor.data, dtype=np.uint8)
    except ValueError:  # nested lists of uneven lengths
        raise InvalidTensor(f"input {INPUT_NAME!r}: data is not shaped {shape}") from None
    if values.size != count or (values.ndim > 1 and list(values.shape) != shape):
        raise InvalidTensor(f"input {INPUT_NAME!r}: {values.size} values for shape {shape}")
    return values.reshape(shape)


class _Quoted(str):
    """Text already quoted: its repr is itself."""

    def __repr__(self) -> str:
        return str(self)


def _problem(err: ValidationError) -> str:
    """One line a client can act on, for the first problem (fail_fast: often the only)."""
    first = err.errors(include_url=False)[0]
    loc, kind = first["loc"], first["type"]
    seen = first.get("input")  # quoted back only when small: never a whole data list
    if not isinstance(seen, str | int | None) and not (isinstance(seen, list) and len(seen) < 9):
        seen = "..."
    if isinstance(seen, str):  # a client's text: cut to a few hundred characters
        seen = _Quoted(quoted(seen))
    if kind == "json_invalid":
        return f"the inference request is not valid JSON ({first['msg']})"
    if kind == "tensor":  # InputTensor.fits: its own words
        return first["msg"]
    if not loc or loc == ("inputs",):
        return (
            "the inference request must be a JSON object with an 'inputs' list of one "
            f"input named {INPUT_NAME!r}"
        )
    match loc[0], loc[2:3]:
        case "inputs", ("name",):
            return (f"expected one input named {INPUT_NAME!r} (UINT8 pixels) or "
                    f"{FILES_NAME!r} (BYTES, encoded images), got {seen!r}")  # fmt: skip
        case "inputs", ("datatype",):
            return f"input {INPUT_NAME!r} must have datatype UINT8 (or {FILES_NAME!r} BYTES)"
        case "inputs", ("shape",):
            return f"an input's shape must be 1 to 4 integers ({INPUT_NAME!r}: [N, 32, 32, 3])"
        case "inputs", ("data",) if kind in ("less_than_equal", "greater_than_equal"):
            return f"input {INPUT_NAME!r}: UINT8 values must be within 0..255"
        case "inputs", ("data",):
            return (
                f"input {INPUT_NAME!r}: data must hold integers only, flat or nested as the shape"
            )
        case "outputs", _ if "classification" in loc:
            return "classification must be an integer from 1 to the number of classes"
    where = quoted(".".join(str(part) for part in loc))[1:-1]
    return f"invalid inference request: {where}: {first['msg'][:300]}"
