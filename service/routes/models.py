"""GET /models, GET /models/{model_id}: what is served, read from the ONNX files."""

import re
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, RedirectResponse

from service.catalog import Catalog, Served
from service.errors import ReportNotFound
from service.http.deps import CatalogDep, PlaneDep
from service.routes.page import REPORT_POLICY, file_response
from service.schemas import ErrorBody, ModelDetail, ModelInfo, ModelList

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(catalog: CatalogDep) -> ModelList:
    """Every model and version served, the default one, and any .onnx file that could not
    be loaded (file name and a short reason; the detail is in the log)."""
    return ModelList(
        default_model=catalog.default_id,
        models=[_info(served, catalog) for served in catalog.served()],
        failed=catalog.failures,
    )


@router.get(
    "/{model_id}",
    response_model=ModelDetail,
    responses={404: {"model": ErrorBody}, 401: {"model": ErrorBody}},
)
def get_model(
    model_id: str,
    catalog: CatalogDep,
    version: Annotated[str | None, Query(description="default: the newest trained")] = None,
) -> ModelDetail:
    """One model's full card: class names, superclasses, training, evaluation and how its
    familiarity is computed."""
    served = catalog.get(model_id, version)
    card = served.model.card
    return ModelDetail(
        **_info(served, catalog).model_dump(),
        class_names=card.class_names,
        superclass_names=card.superclass_names,
        fine_to_coarse=card.fine_to_coarse,
        training=card.training,
        familiarity=card.familiarity,
    )


@router.get(
    "/{model_id}/report",
    response_class=RedirectResponse,
    status_code=307,
    responses={404: {"model": ErrorBody, "description": "Unknown model"}},
)
async def get_report(model_id: str, catalog: CatalogDep) -> RedirectResponse:
    """The model's report (`make report`): what makes CIFAR-100 hard for it.

    Redirects to the page inside the report's folder, so its plots load beside it."""
    return RedirectResponse(f"/models/{catalog.get(model_id).model_id}/report/index.html")


@router.get(
    "/{model_id}/report/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"text/html": {}, "image/png": {}}}, 404: {"model": ErrorBody}},
)
async def get_report_file(
    model_id: str, name: str, catalog: CatalogDep, plane: PlaneDep
) -> FileResponse:
    """A file of the model's report: index.html, report.json or a plot."""
    model_id = catalog.get(model_id).model_id  # a served id: it matches MODEL_ID_PATTERN
    reports = plane.settings.reports_dir.resolve()
    path = (reports / model_id / name).resolve()
    # Flat file names only, and nothing outside REPORTS_DIR, through a symlink or not.
    if (
        not re.fullmatch(r"[\w-]+\.(html|json|png)", name)
        or not path.is_relative_to(reports)
        or not path.is_file()
    ):
        if name == "index.html":
            raise ReportNotFound(f"no report for {model_id!r} yet; run `make report`")
        raise ReportNotFound(f"the report of {model_id!r} has no file {name!r}")
    return file_response(path, REPORT_POLICY)


def _info(served: Served, catalog: Catalog) -> ModelInfo:
    model = served.model
    return ModelInfo(
        model_id=model.model_id,
        version=model.version,
        trained_at=model.trained_at,
        file=model.path.name,
        serving=model.serving,
        provenance=model.provenance,
        ready=served.ready,
        default=catalog.is_default(served),
        parameter_count=model.card.parameter_count,
        evaluation=model.card.evaluation,
    )
