"""Occlusion sensitivity (Zeiler & Fergus, 2014): which pixels decided an answer.

A grey square is slid over the 32x32 image; each occluded copy is classified like any
other image, and where covering the image lowers the explained class's probability most,
the model was looking. Forward passes only: no gradients, nothing but the model's own
outputs, so it runs wherever the model runs (any protocol, any provider, Triton too).

Numbers in, numbers out: the service sends the copies through its data plane, the report
through a session; both use these two functions, so both draw the same map.
"""

import numpy as np

GREY = 128  # the patch's value: mid-grey, neither of the extremes the model may key on
# The square's side and the step between its positions, unless asked otherwise: what
# /explain draws (EXPLAIN_PATCH, EXPLAIN_STRIDE) and what the report draws.
PATCH = 8
STRIDE = 4


def positions(size: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets along one side, the last flush with the edge so every pixel is
    covered at least once whatever the stride."""
    if patch >= size:
        return [0]
    offsets = list(range(0, size - patch + 1, stride))
    if offsets[-1] != size - patch:
        offsets.append(size - patch)
    return offsets


def copies(image: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """uint8 [32, 32, 3] -> uint8 [1 + P, 32, 32, 3]: the image itself, then one copy per
    patch position, row by row."""
    size = image.shape[0]
    offsets = positions(size, patch, stride)
    out = np.repeat(image[None], 1 + len(offsets) ** 2, axis=0)
    k = 1
    for top in offsets:
        for left in offsets:
            out[k, top : top + patch, left : left + patch] = GREY
            k += 1
    return out


def count(patch: int, stride: int, size: int = 32) -> int:
    """Images one explanation sends to the model (what it counts as in every bound)."""
    return 1 + len(positions(size, patch, stride)) ** 2


def heat_map(probabilities: np.ndarray, class_index: int, patch: int, stride: int) -> np.ndarray:
    """[1 + P, classes] probabilities of `copies` -> float32 [32, 32]: at each pixel, the
    mean drop of `class_index`'s probability over the patches that covered it (positive:
    covering it lowered the class; negative: covering it helped)."""
    size = 32
    offsets = positions(size, patch, stride)
    drops = probabilities[0, class_index] - probabilities[1:, class_index]
    total = np.zeros((size, size), dtype=np.float64)
    covered = np.zeros((size, size), dtype=np.float64)
    k = 0
    for top in offsets:
        for left in offsets:
            total[top : top + patch, left : left + patch] += drops[k]
            covered[top : top + patch, left : left + patch] += 1
            k += 1
    return (total / covered).astype(np.float32)
