"""How unlike a photograph an image's pixels are, whatever the network makes of them.

Noise, flat colour, gradients, gratings, checkerboards, text and drawn shapes differ from
photos before any feature is computed: in how neighbouring pixels differ (noise: large and
uncorrelated; flat colour and gradients: nothing; text, shapes, checkerboards: nothing or a
jump, rarely in between), in their colours (few, or unsaturated) and in how their values
spread. `statistics` measures that per image, `fit` fits one Gaussian to the training
photos' statistics (mean and Ledoit-Wolf covariance, as the Mahalanobis score fits the
features), and the strangeness is the squared Mahalanobis distance from it.

This score reads the uint8 images, not the penultimate features every score in
`training.scores.SCORES` is a function of: it is measured by `python -m training ood`
(alone, and combined with a feature score as `combined` combines two), not yet computed
inside the exported graph, so the export cannot choose it.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.scores.mahalanobis import shrunk_covariance

NAME = "pixels"
METHOD = (
    "Mahalanobis distance of low-level image statistics (neighbouring-pixel differences, "
    "their correlation, flat and edge shares, colour saturation, value spread and entropy) "
    "from a Gaussian fitted to the training photos' statistics"
)
BINS = 16  # value histogram bins per channel
EPSILON = 1e-3  # keeps the logarithms of statistics that are 0 for flat images finite
STATISTICS = (
    "log mean |horizontal difference|",
    "log mean |vertical difference|",
    "log std of differences",
    "log mean |second difference|",
    "neighbour correlation",
    "flat share",
    "edge share",
    "log pixel std",
    "mean saturation",
    "saturation spread",
    "value entropy",
    "log mean |diagonal difference|",
)


def statistics(images: np.ndarray) -> np.ndarray:
    """[N, len(STATISTICS)] float64 for uint8 [N, 32, 32, 3] images (values scaled to 0-1)."""
    x = np.asarray(images, np.float64) / 255.0
    dx = np.diff(x, axis=2)
    dy = np.diff(x, axis=1)
    diagonal = x[:, 1:, 1:] - x[:, :-1, :-1]
    second = x[:, :, 2:] - 2 * x[:, :, 1:-1] + x[:, :, :-2]
    both = np.concatenate([dx.reshape(len(x), -1), dy.reshape(len(x), -1)], axis=1)
    grey = x.mean(axis=3)
    centred = grey - grey.mean(axis=(1, 2), keepdims=True)
    variance = (centred**2).mean(axis=(1, 2))
    covariance = (centred[:, :, 1:] * centred[:, :, :-1]).mean(axis=(1, 2))
    # A flat image has no variance to correlate: call it perfectly smooth.
    correlation = np.where(variance > 1e-12, covariance / np.maximum(variance, 1e-12), 1.0)
    magnitude = np.abs(both)
    saturation = x.max(axis=3) - x.min(axis=3)
    levels = np.minimum((x * BINS).astype(np.int64), BINS - 1).reshape(len(x), -1, 3)
    entropy = np.zeros(len(x))
    for channel in range(3):
        counts = np.stack([(levels[:, :, channel] == b).mean(axis=1) for b in range(BINS)], 1)
        entropy -= (counts * np.log(np.maximum(counts, 1e-12))).sum(axis=1) / 3
    return np.stack(
        [
            np.log(EPSILON + np.abs(dx).mean(axis=(1, 2, 3))),
            np.log(EPSILON + np.abs(dy).mean(axis=(1, 2, 3))),
            np.log(EPSILON + both.std(axis=1)),
            np.log(EPSILON + np.abs(second).mean(axis=(1, 2, 3))),
            correlation,
            (magnitude < 1.5 / 255).mean(axis=1),
            (magnitude > 0.25).mean(axis=1),
            np.log(EPSILON + np.sqrt(variance)),
            saturation.mean(axis=(1, 2)),
            saturation.std(axis=(1, 2)),
            entropy,
            np.log(EPSILON + np.abs(diagonal).mean(axis=(1, 2, 3))),
        ],
        axis=1,
    )


@dataclass(frozen=True)
class Pixels:
    center: np.ndarray  # [S] the training photos' mean statistics
    whitening: np.ndarray  # [S, S] W W^T = the inverse of their shrunk covariance
    shrinkage: float
    name: str = NAME

    def strangeness(self, images: np.ndarray) -> np.ndarray:
        """[N] float64: squared Mahalanobis distance of the images' statistics."""
        z = (statistics(images) - self.center) @ self.whitening
        return (z**2).sum(axis=1)

    def card(self) -> dict[str, Any]:
        return {"method": METHOD, "statistics": list(STATISTICS), "shrinkage": self.shrinkage}


def fit(images: np.ndarray) -> Pixels:
    """The Gaussian of the training photos' statistics."""
    values = statistics(images)
    center = values.mean(axis=0)
    covariance, shrinkage, _ = shrunk_covariance(values - center)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    return Pixels(center, eigenvectors / np.sqrt(eigenvalues), float(shrinkage))
