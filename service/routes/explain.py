"""POST /explain: which pixels decided an answer (occlusion sensitivity), per image.

An adapter like /predict: the same uploads, the same data plane. The work is the data
plane's (`DataPlane.explain`): one image becomes `explain.count` occluded copies, handed
to the batcher as one request, so every bound counts every copy."""

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile

from service.errors import BadParameter, quoted
from service.http.deps import ContextDep, PlaneDep
from service.http.uploads import read_images
from service.routes.predict import BINARY, ERRORS, RESIZE_DOC
from service.schemas import ExplainResponse, ImageExplanation

router = APIRouter(tags=["predict"])
CLASS_DOC = "Class to explain, as its id (0-99) or label (`maple_tree`); default: the top class"


@router.post("/explain", response_model=ExplainResponse, responses=ERRORS)
async def explain(
    plane: PlaneDep,
    context: ContextDep,
    file: Annotated[UploadFile, File(description="One image", json_schema_extra=BINARY)],
    model: Annotated[str | None, Query(description="Model id; default: DEFAULT_MODEL")] = None,
    version: Annotated[str | None, Query(description="Version (content hash)")] = None,
    class_: Annotated[str | None, Query(alias="class", description=CLASS_DOC)] = None,
    resize: Annotated[bool, Query(description=RESIZE_DOC)] = False,
) -> ExplainResponse:
    """Occlusion sensitivity (Zeiler & Fergus, 2014): a grey square (EXPLAIN_PATCH pixels)
    slides over the image in steps of EXPLAIN_STRIDE; the map says how much covering each
    pixel lowered the explained class's probability. One image is `1 + positions` images
    of work (50 by default): it counts as that many in the queue bound and the deadline."""
    served = plane.model(context, model, version)  # 404 before decoding
    names = served.model.card.class_names
    index = None if class_ is None else _class_index(class_, names)
    settings = plane.settings
    (image,) = await read_images(plane, [file], resize, max_images=1)
    answer = await plane.explain(context, model, version, image, index)
    return ExplainResponse(
        model_id=answer.served.model_id,
        model_version=answer.served.version,
        inference_ms=round(answer.inference_ms, 3),
        explanations=[
            ImageExplanation(
                filename=file.filename,
                class_id=answer.class_index,
                label=names[answer.class_index],
                probability=answer.probability,
                patch=settings.explain_patch,
                stride=settings.explain_stride,
                heat_map=answer.heat_map.round(5).tolist(),
            )
        ],
    )


def _class_index(value: str, names: list[str]) -> int:
    if value.isdigit() and int(value) < len(names):
        return int(value)
    if value in names:
        return names.index(value)
    raise BadParameter(
        f"class {quoted(value)} is neither a class id (0-{len(names) - 1}) nor a label of this "
        "model (GET /models/{id} lists them)"
    )
