"""Which familiarity score tells the images a model knows from those it does not, measured
the way OpenOOD measures post-hoc detectors, on what can be had without downloads:

    near: the test photos of classes held out of training (`--hold-out`), several pairs of
          classes, a few seeds each: a model trained without them, asked about them;
    far:  families of generated images that are not CIFAR-like (training/families.py).

For every score in training.scores.SCORES (combinations of two included) and the top
probability (MSP, the baseline every paper reports): AUROC (known test images positive) and
the false positive rate at 95 % recall of the known images (the share of other images
still accepted by the threshold that accepts 95 % of the known ones), each averaged over
the runs with its range. `python -m training ood` trains what is missing (resuming, like
train-export), measures, and writes the table the docs show.
"""

import itertools
import time
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np

from contract.hardware import cpu
from training import data as cifar
from training import families
from training.evaluate import known_test_images
from training.export import keras_reference, training_features
from training.recipe import Recipe
from training.report import measures
from training.scores import SCORES
from training.scores.evidence import NEAR, summarise
from training.train import best_checkpoint, run_state, train

RECALL = 0.95
BASELINE = "msp"  # the top probability


def measure(
    model_id: str,
    data: cifar.Cifar100,
    runs_dir: Path,
    recipe: Recipe,
    pairs: list[tuple[str, ...]],
    seeds: list[int],
    images: int,
) -> dict:
    """Train (or reuse) one model per pair of held-out classes and seed, measure every
    score on it, and summarise over the runs."""
    runs = []
    for pair, seed in itertools.product(pairs, seeds):
        run_recipe = replace(recipe, seed=seed, held_out_classes=tuple(pair))
        run_dir = Path(runs_dir) / f"{'-'.join(pair)}-s{seed}" / model_id
        state = run_state(run_dir, run_recipe)
        if state != "finished":
            train(model_id, data, run_dir, run_recipe, resume=state == "interrupted")
        model = keras.models.load_model(best_checkpoint(run_dir))
        print(f"Measuring {model_id} without {', '.join(pair)}, seed {seed}", flush=True)
        sets = measure_run(model, data, tuple(pair), seed, images)
        runs.append({"held_out": list(pair), "seed": seed, "sets": sets})
    return {
        "model": model_id,
        "recipe": recipe.record() | {"seed": seeds, "held_out_classes": [list(p) for p in pairs]},
        "recall": RECALL,
        "images_per_family": images,
        "families": {
            name: " ".join(family.__doc__.split()) for name, family in families.FAMILIES.items()
        },
        "machine": cpu(),
        "measured_at": time.strftime("%Y-%m-%d", time.gmtime()),
        "summary": summarise(runs),
        "runs": runs,
    }


def measure_run(
    model: keras.Model, data: cifar.Cifar100, held_out: tuple[str, ...], seed: int, images: int
) -> dict:
    """{set: {score: {"auroc", "fpr"}}} for one model: the held-out classes' test photos
    and every family, against the known classes' test photos."""
    kept = cifar.without_classes(data, held_out)
    known = known_test_images(data, held_out)
    photos = data.test.images[known]
    others = {NEAR: data.test.images[~known], **families.generate(images, seed, photos)}
    training = training_features(model, kept.train.images, kept.train.fine)
    outputs = {name: keras_reference(model, images) for name, images in others.items()}
    known_probabilities, known_features = keras_reference(model, photos)

    # Known-ness per score: higher = more like the training data. Minus the raw score, not
    # the file's familiarity (its rank among the validation images: the same order, but
    # every image stranger than all validation images ties at 0), as OpenOOD measures.
    fitted = {name: fit(training) for name, fit in SCORES.items()}

    def knownness(features: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        values = {name: -f.strangeness(features) for name, f in fitted.items()}
        values[BASELINE] = probabilities.max(axis=1)
        return values

    reference = knownness(known_features, known_probabilities)
    result = {}
    for name, (probabilities, features) in outputs.items():
        values = knownness(features, probabilities)
        result[name] = {
            score: {
                "auroc": measures.auroc(reference[score], values[score]),
                "fpr": measures.false_positives_at_recall(reference[score], values[score], RECALL)[
                    "false_positive_rate"
                ],
            }
            for score in values
        }
    return result
