"""POST /predict: decode the uploads, call the model, encode the answer."""

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from service.deps import CatalogDep, MetricsDep, SettingsDep
from service.errors import InvalidImage, TooManyImages, UploadTooLarge
from service.images import decode_image
from service.schemas import ErrorBody, PredictResponse, describe

router = APIRouter(tags=["predict"])

ERRORS = {
    404: {"model": ErrorBody, "description": "Unknown model"},
    413: {
        "model": ErrorBody,
        "description": "Upload too large, too many images, or too many pixels",
    },
    422: {"description": "Not an image, truncated, empty, not 32x32, or bad parameters"},
    503: {"model": ErrorBody, "description": "No model loaded"},
}


@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    request: Request,
    files: Annotated[
        list[UploadFile],
        File(
            description="One or more 32x32 images: PNG, JPEG, BMP, GIF, WebP or TIFF",
            # Swagger UI shows a file picker for `format: binary`, not for the OpenAPI 3.1
            # `contentMediaType` FastAPI writes: without this, /docs could not upload.
            json_schema_extra={"items": {"type": "string", "format": "binary"}},
        ),
    ],
    catalog: CatalogDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    model: Annotated[str | None, Query(description="Model id; default: DEFAULT_MODEL")] = None,
    top_k: Annotated[int, Query(ge=1, le=100, description="Fine classes to return")] = 5,
    resize: Annotated[
        bool, Query(description="Centre-crop to a square and resize to 32x32 instead of refusing")
    ] = False,
) -> PredictResponse:
    """Classify images into the 100 CIFAR-100 classes and their 20 superclasses."""
    classifier = catalog.get(model)
    request.state.model_id = classifier.model_id  # for the metrics labels
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
    contents = [await upload.read() for upload in files]
    if resize:  # images of any size (up to MAX_IMAGE_PIXELS): decode off the event loop
        images = await run_in_threadpool(
            _decode_all, contents, files, resize, settings.max_image_pixels
        )
    else:  # 32x32 or refused from the header: microseconds, cheaper than a thread hop
        images = _decode_all(contents, files, resize, settings.max_image_pixels)

    start = time.perf_counter()
    batcher = catalog.batchers.get(classifier.model_id)
    if batcher is not None:
        probabilities = await batcher.predict(images)
    else:
        probabilities = await run_in_threadpool(classifier.predict, images)
    inference_ms = (time.perf_counter() - start) * 1000
    metrics.images.labels(classifier.model_id).inc(len(images))

    return PredictResponse(
        model_id=classifier.model_id,
        inference_ms=round(inference_ms, 3),
        predictions=[
            describe(classifier, row, top_k, upload.filename)
            for row, upload in zip(probabilities, files, strict=True)
        ],
    )


def _decode_all(
    contents: list[bytes], files: list[UploadFile], resize: bool, max_pixels: int
) -> np.ndarray:
    images = []
    for index, (data, upload) in enumerate(zip(contents, files, strict=True)):
        try:
            images.append(decode_image(data, resize, max_pixels))
        except (InvalidImage, UploadTooLarge) as err:
            raise type(err)(f"{_name(index, upload)}: {err.message}") from None
    return np.stack(images)


def _name(index: int, upload: UploadFile) -> str:
    return f"image {index + 1} ({upload.filename!r})" if upload.filename else f"image {index + 1}"
