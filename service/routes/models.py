"""GET /models, GET /models/{model_id}: what is served, read from the ONNX files."""

import re

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.catalog import Catalog
from service.classifier import Classifier
from service.deps import CatalogDep, SettingsDep
from service.errors import ReportNotFound
from service.schemas import ErrorBody, ModelDetail, ModelInfo, ModelList

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(catalog: CatalogDep) -> ModelList:
    """Every model served, the default one, and any .onnx file that could not be loaded."""
    return ModelList(
        default_model=catalog.default_id,
        models=[_info(model, catalog) for model in catalog.models.values()],
        failed=catalog.failures,
    )


@router.get("/{model_id}", response_model=ModelDetail, responses={404: {"model": ErrorBody}})
def get_model(model_id: str, catalog: CatalogDep) -> ModelDetail:
    """One model's full card: class names, superclasses, training and evaluation."""
    model = catalog.get(model_id)
    card = model.card
    return ModelDetail(
        **_info(model, catalog).model_dump(),
        class_names=card.class_names,
        superclass_names=card.superclass_names,
        fine_to_coarse=card.fine_to_coarse,
        training=card.training,
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
    model_id: str, name: str, catalog: CatalogDep, settings: SettingsDep
) -> FileResponse:
    """A file of the model's report: index.html, report.json or a plot."""
    model_id = catalog.get(model_id).model_id  # a served id: it matches MODEL_ID_PATTERN
    reports = settings.reports_dir.resolve()
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
    return FileResponse(path)


def _info(model: Classifier, catalog: Catalog) -> ModelInfo:
    return ModelInfo(
        model_id=model.model_id,
        file=model.path.name,
        provider=model.provider,
        ready=model.ready,
        default=model.model_id == catalog.default_id,
        parameter_count=model.card.parameter_count,
        evaluation=model.card.evaluation,
    )
