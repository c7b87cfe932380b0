"""The models this server holds: every *.onnx in MODELS_DIR, loaded and warmed up at start.

A file that cannot be served is reported by name with a short reason (the detail goes to
the log) and skipped; the others still load. Only regular files are opened, each within
a time limit, so a FIFO or a hung network mount cannot stall startup.

`infer` is the one path from a tensor to probabilities: /predict and /v2 both call it,
so batching, queue bounds and deadlines hold for every protocol.
"""

import asyncio
import logging
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.batching import MicroBatcher, Outputs
from service.classifier import Classifier
from service.config import Settings
from service.errors import InvalidModel, NotReady, UnknownModel
from service.metrics import Metrics

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

    async def infer(self, model: Classifier, images: np.ndarray, deadline: float) -> Outputs:
        """Every output for `images`, computed in some batch before `deadline` (loop clock)."""
        return await self.batchers[model.model_id].predict(images, deadline)

    @property
    def ready(self) -> bool:
        return any(
            model.ready and self.batchers[model_id].alive
            for model_id, model in self.models.items()
            if model_id in self.batchers
        )

    def not_ready_reason(self) -> str:
        if self.models:
            return "no model can take requests: " + ", ".join(
                f"the batcher of {model_id} is not running"
                for model_id, batcher in self.batchers.items()
                if not batcher.alive
            )
        if self.failures:
            problems = "; ".join(f"{name}: {why}" for name, why in self.failures.items())
            return f"no model could be loaded ({problems})"
        return "no model loaded: no .onnx files found; run `make train-export` first"

    def start_batchers(self, settings: Settings, metrics: Metrics) -> None:
        for model_id, model in self.models.items():
            batcher = MicroBatcher(
                model.run,
                max_batch=settings.batch_max_size,
                max_wait=settings.batch_max_wait_ms / 1000,
                max_queue=settings.max_queue_images,
                combine=settings.batching,
                on_batch=metrics.batch_size.labels(model_id).observe,
                on_drop=lambda reason, images, m=model_id: metrics.dropped.labels(m, reason).inc(
                    images
                ),
                name=model_id,
            )
            batcher.start()
            self.batchers[model_id] = batcher

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()


async def load_catalog(settings: Settings) -> Catalog:
    catalog = Catalog()
    for path in sorted(Path(settings.models_dir).glob("*.onnx")):
        try:
            model = await asyncio.wait_for(
                asyncio.to_thread(_load, path, settings), settings.model_load_timeout_seconds
            )
            if model.model_id in catalog.models:
                raise InvalidModel(
                    f"{path.name}: model id {model.model_id!r} is already served from "
                    f"{catalog.models[model.model_id].path.name}"
                )
        except TimeoutError:
            # The thread cannot be stopped; it is left to finish or hang on its own.
            _skip(catalog, path, f"it took over {settings.model_load_timeout_seconds:g} s to load")
            continue
        except InvalidModel as err:
            _skip(catalog, path, err.message.removeprefix(f"{path.name}: "), err.__cause__)
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


def _load(path: Path, settings: Settings) -> Classifier:
    # Only regular files: opening a FIFO or a device would block or read forever.
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError:
        regular = False  # a dangling symlink
    if not regular:
        raise InvalidModel(f"{path.name}: not a regular file")
    model = Classifier(path, settings.device, settings.onnx_threads, settings.inter_op_threads)
    model.warm_up()
    return model


def _skip(catalog: Catalog, path: Path, reason: str, cause: BaseException | None = None) -> None:
    log.error("model not served", extra={"file": str(path), "reason": reason, "cause": str(cause)})
    catalog.failures[path.name] = reason
