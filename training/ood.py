"""Which familiarity score tells the images a model knows from those it does not, measured
the way OpenOOD measures post-hoc detectors, on what can be had without downloads:

    near: the test photos of classes held out of training (`--hold-out`), several pairs of
          classes, a few seeds each: a model trained without them, asked about them;
    far:  families of generated images that are not CIFAR-like (training/families.py).

For every score in training.scores.SCORES (the pixel statistics score and combinations of
two included), and the top probability (MSP, the baseline every paper reports): AUROC
(known test images positive) and the false positive rate at 95 % recall of the known images
(the share of other images still accepted by the threshold that accepts 95 % of the known
ones), each averaged over the runs with its range. `python -m training ood` trains what is
missing (resuming, like train-export), measures, and writes the table the docs show.

A score is not judged on the images it was chosen on: `choose` splits the families into a
choosing half and a judging half, about half of every kind in each (families.split), for
SPLIT_SEEDS and each split reversed; on each it picks the score with the best mean of the
held-out classes' AUROC and the choosing families' mean AUROC, and reports that score's
AUROC on every judging family beside MSP's and the shipped default's.
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
from training.scores import DEFAULT, SCORES
from training.scores.base import Inputs
from training.scores.evidence import NEAR, summarise
from training.train import best_checkpoint, run_state, train

RECALL = 0.95
# A floor that refuses at most 1 % of the known photos: what share of each family it refuses.
FLOOR_RECALL = 0.99
BASELINE = "msp"  # the top probability
SPLIT_SEEDS = (0, 1, 2)


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
        "floor_recall": FLOOR_RECALL,
        "images_per_family": images,
        "families": {
            name: " ".join(family.__doc__.split()) for name, family in families.FAMILIES.items()
        },
        "kinds": {kind: list(named) for kind, named in families.KINDS.items()},
        "exportable": list(SCORES),
        "machine": cpu(),
        "measured_at": time.strftime("%Y-%m-%d", time.gmtime()),
        "summary": (summary := summarise(runs)),
        "choice": choose(summary),
        "runs": runs,
    }


def choose(summary: dict) -> dict:
    """On every split (SPLIT_SEEDS, each also reversed) the score with the best mean of
    the held-out classes' AUROC and the choosing families' mean AUROC, among the scores
    the export can build (`exportable`) and among every score measured (`any`); their
    AUROC on each judging family, with MSP's and the shipped default's."""
    candidates = [name for name in summary[NEAR] if name != BASELINE]
    splits = []
    for seed in SPLIT_SEEDS:
        halves = families.split(seed)
        for reverse in (False, True):
            choosing, judging = halves[::-1] if reverse else halves

            def merit(score: str, choosing: list[str] = choosing) -> float:
                far = np.mean([summary[name][score]["auroc"] for name in choosing])
                return float(summary[NEAR][score]["auroc"] + far) / 2

            exportable = max((c for c in candidates if c in SCORES), key=merit)
            best = max(candidates, key=merit)
            shown = dict.fromkeys([exportable, best, DEFAULT, BASELINE])
            splits.append({
                "seed": seed,
                "reversed": reverse,
                "choosing": choosing,
                "judging": judging,
                "exportable": exportable,
                "any": best,
                "judged": {
                    name: {score: summary[name][score]["auroc"] for score in shown}
                    for name in [NEAR, *judging]
                },
            })  # fmt: skip
    return {
        "rule": "best mean of the held-out classes' AUROC and the choosing families' mean AUROC",
        "splits": splits,
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
    # Each score is fitted and computed as the export fits and computes it.
    fitted = {name: fit(training) for name, fit in SCORES.items()}

    def knownness(inputs: Inputs[np.ndarray], probabilities: np.ndarray) -> dict[str, np.ndarray]:
        values = {name: -f.strangeness(inputs) for name, f in fitted.items()}
        values[BASELINE] = probabilities.max(axis=1)
        return values

    reference = knownness(Inputs(photos, known_features), known_probabilities)
    result = {}
    for name, (probabilities, features) in outputs.items():
        values = knownness(Inputs(others[name], features), probabilities)
        result[name] = {score: cell(reference[score], values[score]) for score in values}
    return result


def cell(known: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """AUROC, the false positive rate at RECALL, and `refused`: the share of the others
    below the floor that refuses at most 1 - FLOOR_RECALL of the known photos."""
    at = measures.false_positives_at_recall
    return {
        "auroc": measures.auroc(known, other),
        "fpr": at(known, other, RECALL)["false_positive_rate"],
        "refused": 1 - at(known, other, FLOOR_RECALL)["false_positive_rate"],
    }
