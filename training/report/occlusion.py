"""What made the model say one class for another: for the most confused pairs, a few of the
test images it got wrong, with the occlusion heat maps of both classes side by side.

The occluded copies and the maps are contract/occlusion.py's (what /explain draws), scored by
the report's Classifier, and the patch and stride are the service's defaults, so the
report's maps are the ones the service would draw for the same image.
"""

from collections.abc import Callable

import numpy as np

from contract.occlusion import PATCH, STRIDE, copies, count, heat_map

PAIRS = 4  # the most confused pairs explained
IMAGES_PER_PAIR = 2  # the images of a pair the model is surest of its wrong answer on


def explain_confusions(
    run: Callable[[np.ndarray], np.ndarray],
    pairs: list[dict],
    images: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray,
    names: list[str],
    patch: int = PATCH,
    stride: int = STRIDE,
) -> tuple[dict, list[np.ndarray]]:
    """For each of the first PAIRS `pairs` (analysis's most_confused_pairs, by name), the
    IMAGES_PER_PAIR test images of the true class given the predicted one with the highest
    probability (ties: the lower index). `run` maps uint8 images to probabilities;
    `images`, `labels` and `probabilities` cover the whole test file, so the indices are
    its image numbers.

    Returns the numbers for report.json and, per example, float32 [2, 32, 32]: the heat
    maps of the true and of the predicted class (positive: covering there lowers that
    class's probability)."""
    index = {name: i for i, name in enumerate(names)}
    predicted = probabilities.argmax(axis=1)
    examples, maps = [], []
    for pair in pairs[:PAIRS]:
        true, taken_for = index[pair["true"]], index[pair["predicted"]]
        hits = np.flatnonzero((labels == true) & (predicted == taken_for))
        surest = hits[np.argsort(-probabilities[hits, taken_for], kind="stable")]
        for i in surest[:IMAGES_PER_PAIR]:
            scores = run(copies(images[i], patch, stride))
            both = np.stack([heat_map(scores, c, patch, stride) for c in (true, taken_for)])
            examples.append(
                {
                    "true": pair["true"],
                    "predicted": pair["predicted"],
                    "index": int(i),
                    "true_probability": float(scores[0, true]),
                    "predicted_probability": float(scores[0, taken_for]),
                    "map_correlation": correlation(both[0], both[1]),
                }
            )
            maps.append(both)
    numbers = {
        "patch": patch,
        "stride": stride,
        "copies_per_image": count(patch, stride),
        "examples": examples,
    }
    return numbers, maps


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two maps' pixels: near 1, the same regions decide both
    classes; near -1, what speaks for one speaks against the other. None if a map is flat."""
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
