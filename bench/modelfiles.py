"""The ONNX files a benchmark serves: the trained ones, or untrained exports in their place.

Speed does not depend on the weights, so a model not trained yet is exported untrained
(same architecture, same graph) and labelled so in the results. A file taken from the
models folder is verified as the service verifies it where TRUSTED_KEYS is set in the
benchmark's environment (contract/trust.py): the bytes copied are the bytes verified, and
its signature bundle goes with them."""

import os
from pathlib import Path

import keras
import numpy as np

from contract.modelcard import ModelCard
from contract.trust import TrustedKeys, bundle_path, provenance
from training.export import export
from training.models import MODEL_IDS, build_model
from training.synthetic import make_images

VALIDATION_IMAGES = 5000  # python -m training's default --val-size
TRIVIAL = "trivial"  # a model that costs next to nothing: what remains is the serving path


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
        if model_id == TRIVIAL:
            export_trivial(target)
            files[model_id] = (target, "a trivial model: mean colour, 8 units, 100 classes")
        elif trained.exists():
            copy_verified(trained, target)
            files[model_id] = (target, "trained weights")
        else:
            export_untrained(model_id, target)
            files[model_id] = (target, "untrained weights (speed only)")
    return files


def copy_verified(source: Path, target: Path) -> None:
    """`source`'s bytes and bundle to `target`, once verified against TRUSTED_KEYS where it
    is set (InvalidModel, with the reason, where they do not verify)."""
    keys = os.environ.get("TRUSTED_KEYS")
    content = source.read_bytes()
    provenance(source, content, TrustedKeys(Path(keys)) if keys else None)
    target.write_bytes(content)
    if bundle_path(source).is_file():
        bundle_path(target).write_bytes(bundle_path(source).read_bytes())


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


def export_trivial(path: Path) -> None:
    """A file with the contract of every export (uint8 images in, probabilities, features
    and familiarity out, card and self-check inside) whose inference costs microseconds:
    the mean colour of the image through 8 units to 100 classes."""
    model = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(100, activation="softmax", name="predictions"),
    ])  # fmt: skip
    card = ModelCard(
        model_id=TRIVIAL,
        class_names=[f"class_{i}" for i in range(100)],
        superclass_names=[f"superclass_{i}" for i in range(20)],
        fine_to_coarse=[i % 20 for i in range(100)],
        parameter_count=model.count_params(),
        training={"source": "untrained, for benchmarks of the serving path only"},
    )
    labels = np.arange(1000) % 100
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    export(model, card, path, images, train_images=make_images(labels, seed=1),
           train_labels=labels, val_images=make_images(labels, seed=2))  # fmt: skip
