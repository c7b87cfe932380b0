"""Test-set numbers for a model, computed from its probabilities (NumPy only).

Two superclass accuracies, named apart because they can differ:
    superclass_of_top_class_accuracy  the superclass of the top fine class (a model that
                                      calls a maple a willow is right on "trees")
    summed_superclass_accuracy        the superclass with the highest summed fine
                                      probability: what the service returns

A model whose recipe held classes out of training is scored on the test images of the
other classes only (a held-out image has no right answer it could give); the numbers say
which classes were left out and how many test images that set aside.
"""

import numpy as np

from contract.modelcard import superclass_probabilities
from training.data import Cifar100, held_out_indices


def compute_metrics(
    probabilities: np.ndarray,
    fine_labels: np.ndarray,
    fine_to_coarse: list[int],
    class_names: list[str],
    superclass_names: list[str],
) -> dict:
    """Top-1, top-5, superclass accuracy and the per-class and per-superclass breakdowns."""
    to_coarse = np.asarray(fine_to_coarse)
    predicted = probabilities.argmax(axis=1)
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    correct = predicted == fine_labels
    true_coarse = to_coarse[fine_labels]
    coarse_correct = to_coarse[predicted] == true_coarse
    summed = superclass_probabilities(probabilities, list(fine_to_coarse))  # as served
    summed_correct = summed.argmax(axis=1) == true_coarse
    return {
        "images": len(fine_labels),
        "top1_accuracy": float(correct.mean()),
        "top5_accuracy": float((top5 == fine_labels[:, None]).any(axis=1).mean()),
        "superclass_of_top_class_accuracy": float(coarse_correct.mean()),
        "summed_superclass_accuracy": float(summed_correct.mean()),
        "per_class_accuracy": {
            name: _mean(correct[fine_labels == i]) for i, name in enumerate(class_names)
        },
        "per_superclass_of_top_class_accuracy": {
            name: _mean(coarse_correct[true_coarse == i]) for i, name in enumerate(superclass_names)
        },
        "per_superclass_summed_accuracy": {
            name: _mean(summed_correct[true_coarse == i]) for i, name in enumerate(superclass_names)
        },
    }


def evaluate_test_set(predict, data: Cifar100, held_out: tuple[str, ...] = ()) -> dict:
    """Metrics of `predict` (uint8 images -> probabilities) on the test set, over the
    classes not in `held_out`, and under "held_out_classes" what was set aside."""
    known = known_test_images(data, held_out)
    probabilities = predict(data.test.images[known])
    metrics = compute_metrics(
        probabilities,
        data.test.fine[known],
        data.fine_to_coarse,
        data.class_names,
        data.superclass_names,
    )
    metrics["held_out_classes"] = {
        "classes": sorted(held_out),
        "test_images": int((~known).sum()),
        "scored": "test accuracy is over the other classes' test images only",
    }
    return metrics


def known_test_images(data: Cifar100, held_out: tuple[str, ...]) -> np.ndarray:
    """bool [test images]: True for the images of classes the model was trained on."""
    indices = held_out_indices(data, held_out) if held_out else []
    return np.isin(data.test.fine, indices, invert=True)


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None
