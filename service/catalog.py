"""The models this server holds: every *.onnx in MODELS_DIR, loaded and warmed up at start.

A file that cannot be served is reported by name and skipped; the others still load.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from service.batching import MicroBatcher
from service.classifier import Classifier
from service.config import Settings
from service.errors import InvalidModel, NotReady, UnknownModel

log = logging.getLogger(__name__)


@dataclass
class Catalog:
    models: dict[str, Classifier] = field(default_factory=dict)
    batchers: dict[str, MicroBatcher] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # file name -> why it is not served
    default_id: str | None = None

    def get(self, model_id: str | None) -> Classifier:
        """The model asked for, or the default one."""
        if not self.models:
            raise NotReady(self.not_ready_reason())
        model_id = model_id or self.default_id
        if model_id not in self.models:
            raise UnknownModel(
                f"unknown model {model_id!r}; available: {', '.join(sorted(self.models))}"
            )
        return self.models[model_id]

    @property
    def ready(self) -> bool:
        return any(model.ready for model in self.models.values())

    def not_ready_reason(self) -> str:
        if self.failures:
            problems = "; ".join(f"{name}: {why}" for name, why in self.failures.items())
            return f"no model could be loaded ({problems})"
        return "no model loaded: no .onnx files found; run `make train-export` first"


def load_catalog(settings: Settings) -> Catalog:
    catalog = Catalog()
    models_dir = Path(settings.models_dir)
    for path in sorted(models_dir.glob("*.onnx")):
        try:
            model = Classifier(
                path, settings.device, settings.onnx_threads, settings.inter_op_threads
            )
            if model.model_id in catalog.models:
                raise InvalidModel(
                    f"{path.name}: model id {model.model_id!r} is already served from "
                    f"{catalog.models[model.model_id].path.name}"
                )
            model.warm_up()
        except InvalidModel as err:
            log.error("model not served", extra={"file": path.name, "reason": err.message})
            catalog.failures[path.name] = err.message.removeprefix(f"{path.name}: ")
            continue
        catalog.models[model.model_id] = model
        log.info(
            "model loaded",
            extra={"model": model.model_id, "file": path.name, "provider": model.provider},
        )
    if settings.default_model and settings.default_model not in catalog.models:
        log.warning("DEFAULT_MODEL is not loaded", extra={"model": settings.default_model})
    largest = max(catalog.models.values(), key=lambda m: m.card.parameter_count, default=None)
    if settings.default_model in catalog.models:
        catalog.default_id = settings.default_model
    elif largest is not None:
        catalog.default_id = largest.model_id
    if not catalog.models:
        log.error("not ready", extra={"reason": catalog.not_ready_reason()})
    return catalog
