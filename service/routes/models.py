"""GET /models, GET /models/{model_id}: what is served, read from the ONNX files."""

from fastapi import APIRouter

from service.catalog import Catalog
from service.classifier import Classifier
from service.deps import CatalogDep
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
