"""POST /predict: decode the uploads, call the data plane, encode the answer."""

from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile
from PIL import Image

from service.config import Settings
from service.deps import PlaneDep, RecordDep
from service.errors import InvalidImage, TooManyImages, UploadTooLarge
from service.images import decode, decoded_pixels, open_image
from service.modelcard import IMAGE_SIZE
from service.schemas import ErrorBody, PredictResponse, describe

router = APIRouter(tags=["predict"])
SQUARE = (IMAGE_SIZE, IMAGE_SIZE)

ERRORS = {
    400: {"model": ErrorBody, "description": "The body is not a readable multipart form"},
    401: {"model": ErrorBody, "description": "API_KEYS is set and no valid key was sent"},
    404: {"model": ErrorBody, "description": "Unknown model or version"},
    408: {"model": ErrorBody, "description": "The body did not arrive in time"},
    413: {
        "model": ErrorBody,
        "description": "Upload too large, too many images, or too many pixels",
    },
    422: {"description": "Not an image, truncated, empty, not 32x32, or bad parameters"},
    503: {
        "model": ErrorBody,
        "description": "No model loaded, shutting down, or overloaded (shed at once, with "
        "Retry-After)",
    },
    504: {"model": ErrorBody, "description": "Not answered before the request's deadline"},
}


FILES_DOC = "One or more 32x32 images: PNG, JPEG, BMP, GIF, WebP or TIFF"
FILE_DOC = "One image, as `curl -F file=@cat.png` sends it (beside or instead of `files`)"
# Swagger UI shows a file picker for `format: binary`, not for the OpenAPI 3.1
# `contentMediaType` FastAPI writes: without this, /docs could not upload.
BINARY = {"type": "string", "format": "binary"}


@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    request: Request,
    plane: PlaneDep,
    record: RecordDep,
    files: Annotated[
        list[UploadFile], File(description=FILES_DOC, json_schema_extra={"items": BINARY})
    ] = (),  # optional: `file` may carry the one image instead
    file: Annotated[
        UploadFile | None,
        File(description=FILE_DOC, json_schema_extra=BINARY),
    ] = None,
    model: Annotated[str | None, Query(description="Model id; default: DEFAULT_MODEL")] = None,
    version: Annotated[
        str | None, Query(description="Version (content hash); default: the newest trained")
    ] = None,
    top_k: Annotated[int, Query(ge=1, le=100, description="Fine classes to return")] = 5,
    resize: Annotated[
        bool, Query(description="Centre-crop to a square and resize to 32x32 instead of refusing")
    ] = False,
) -> PredictResponse:
    """Classify images into the 100 CIFAR-100 classes and their 20 superclasses.

    Send at least one image: as `files` (one or more), or as `file` (one)."""
    settings = plane.settings
    plane.model(record, model, version)  # unknown model or version: 404 before decoding
    files = [*([file] if file is not None else []), *files]
    if not files:
        raise InvalidImage("send at least one image, as `files` (or `file`)")
    if len(files) > settings.max_images_per_request:
        raise TooManyImages(
            f"{len(files)} images in one request; at most {settings.max_images_per_request}"
        )
    for index, upload in enumerate(files):
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise UploadTooLarge(
                f"{_name(index, upload)} is {upload.size:,} bytes; "
                f"the limit is {settings.max_upload_bytes:,} per image"
            )
    contents = []
    for upload in files:  # each part's buffer is freed as soon as its bytes are ours
        contents.append(await upload.read())
        await upload.close()
    opened = _open_all(contents, files, resize, settings)  # headers only: cheap
    if any(image.size != SQUARE for image in opened):  # real decoding work: bounded
        images = await plane.decode(lambda: _decode_all(opened, files))
    else:  # 32x32: microseconds, cheaper than a thread hop
        images = _decode_all(opened, files)
    served, outputs, inference_ms = await plane.infer(
        record, request.receive, model, version, images
    )
    return PredictResponse(
        model_id=served.model_id,
        model_version=served.version,
        inference_ms=round(inference_ms, 3),
        predictions=[
            describe(served.model, row, top_k, upload.filename)
            for row, upload in zip(outputs["probabilities"], files, strict=True)
        ],
    )


def _open_all(
    contents: list[bytes], files: list[UploadFile], resize: bool, settings: Settings
) -> list[Image.Image]:
    """Every header, checked before any pixel is decoded: per image and per request."""
    opened = []
    for index, (data, upload) in enumerate(zip(contents, files, strict=True)):
        try:
            opened.append(open_image(data, resize, settings.max_image_pixels))
        except (InvalidImage, UploadTooLarge) as err:
            raise type(err)(f"{_name(index, upload)}: {err.message}") from None
    total = sum(map(decoded_pixels, opened))
    if total > settings.max_request_pixels:
        raise UploadTooLarge(
            f"the images of this request would decode to {total:,} pixels; the limit is "
            f"{settings.max_request_pixels:,} per request (send fewer or smaller images)"
        )
    return opened


def _decode_all(opened: list[Image.Image], files: list[UploadFile]) -> np.ndarray:
    images = []
    for index, (image, upload) in enumerate(zip(opened, files, strict=True)):
        try:
            images.append(decode(image, resize=image.size != SQUARE))
        except InvalidImage as err:
            raise InvalidImage(f"{_name(index, upload)}: {err.message}") from None
    return np.stack(images)


def _name(index: int, upload: UploadFile) -> str:
    return f"image {index + 1} ({upload.filename!r})" if upload.filename else f"image {index + 1}"
