"""POST /predict: decode the uploads, call the data plane, encode the answer."""

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from contract.modelcard import FAMILIARITY_NAME, OUTPUT_NAME
from service.http.deps import ContextDep, PlaneDep
from service.http.uploads import read_images
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
RESIZE_DOC = "Centre-crop to a square and resize to 32x32 instead of refusing"
MIN_FAMILIARITY_DOC = (
    "Refuse (422) images whose familiarity is below this: 0.01 refuses images stranger "
    "than 99 % of the validation set; default MIN_FAMILIARITY (0: off)"
)
# Swagger UI shows a file picker for `format: binary`, not for the OpenAPI 3.1
# `contentMediaType` FastAPI writes: without this, /docs could not upload.
BINARY = {"type": "string", "format": "binary"}


@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    plane: PlaneDep,
    context: ContextDep,
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
    top_k: Annotated[
        int, Query(ge=1, le=100, description="Fine classes to return")
    ] = DEFAULT_TOP_K,
    resize: Annotated[bool, Query(description=RESIZE_DOC)] = False,
    min_familiarity: Annotated[
        float | None, Query(ge=0, le=1, description=MIN_FAMILIARITY_DOC)
    ] = None,
) -> PredictResponse:
    """Classify images into the 100 CIFAR-100 classes and their 20 superclasses, each
    with its familiarity (how like the training data it is).

    Send at least one image: as `files` (one or more), or as `file` (one)."""
    plane.model(context, model, version)  # unknown model or version: 404 before decoding
    uploads = [*([file] if file is not None else []), *files]
    images = await read_images(plane, uploads, resize, plane.settings.max_images_per_request)
    served, outputs, inference_ms = await plane.infer(
        context, model, version, images, min_familiarity=min_familiarity
    )
    familiarity = outputs.get(FAMILIARITY_NAME)
    return PredictResponse(
        model_id=served.model_id,
        model_version=served.version,
        inference_ms=round(inference_ms, 3),
        predictions=[
            describe(
                served.model,
                row,
                top_k,
                upload.filename,
                None if familiarity is None else float(familiarity[i, 0]),
            )
            for i, (row, upload) in enumerate(zip(outputs[OUTPUT_NAME], uploads, strict=True))
        ],
    )
