"""The ONNX files a benchmark serves: the trained ones, or untrained exports in their place.

Speed does not depend on the weights, so a model not trained yet is exported untrained
(same architecture, same graph) and labelled so in the results."""

from pathlib import Path

import numpy as np

from service.modelcard import ModelCard
from training.export import export
from training.models import MODEL_IDS, build_model
from training.synthetic import make_images

VALIDATION_IMAGES = 5000  # python -m training's default --val-size


def model_files(
    models_dir: Path, work: Path, model_ids: list[str] | tuple[str, ...] = MODEL_IDS
) -> dict[str, tuple[Path, str]]:
    """Each model's ONNX file, alone in a folder under `work`: id -> (path, weights)."""
    files = {}
    for model_id in model_ids:
        folder = work / model_id
        folder.mkdir(parents=True, exist_ok=True)
        trained = Path(models_dir) / f"{model_id}.onnx"
        target = folder / trained.name
        if trained.exists():
            target.write_bytes(trained.read_bytes())
            files[model_id] = (target, "trained weights")
        else:
            export_untrained(model_id, target)
            files[model_id] = (target, "untrained weights (speed only)")
    return files


def export_untrained(model_id: str, path: Path) -> None:
    model = build_model(model_id)
    card = ModelCard(
        model_id=model_id,
        class_names=[f"class_{i}" for i in range(100)],
        superclass_names=[f"superclass_{i}" for i in range(20)],
        fine_to_coarse=[i % 20 for i in range(100)],
        parameter_count=model.count_params(),
        training={"source": "untrained, for benchmarks only"},
    )
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    # The familiarity output is part of the graph whatever the weights, and its cost grows
    # with the number of validation distances it compares against: calibrate on as many
    # (synthetic) images as a trained export's default validation split, so it costs the
    # same; fit on a few per class.
    labels = np.arange(VALIDATION_IMAGES) % 100
    export(
        model,
        card,
        path,
        images,
        train_images=make_images(labels[:1000], seed=1),
        train_labels=labels[:1000],
        val_images=make_images(labels, seed=2),
    )
