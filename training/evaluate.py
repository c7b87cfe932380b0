"""Test-set numbers for a model, computed from its probabilities (NumPy only).

Two superclass accuracies, named apart because they can differ:
    superclass_of_top_class_accuracy  the superclass of the top fine class (a model that
                                      calls a maple a willow is right on "trees")
    summed_superclass_accuracy        the superclass with the highest summed fine
                                      probability: what the service returns
"""

import numpy as np

from service.modelcard import superclass_probabilities
from training.data import Cifar100


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


def evaluate_test_set(predict, data: Cifar100) -> dict:
    """Metrics of `predict` (uint8 images -> probabilities) on the test set."""
    probabilities = predict(data.test.images)
    return compute_metrics(
        probabilities, data.test.fine, data.fine_to_coarse, data.class_names, data.superclass_names
    )


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None
