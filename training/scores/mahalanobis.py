"""Mahalanobis distance to the nearest class mean (Lee et al., 2018, "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"; OpenOOD's MDS).

Fit one mean per class and one shared covariance to the training features; an image's
strangeness is its squared Mahalanobis distance to the nearest class mean. Only classes
with training images get a mean: a run that held classes out of training must not have
their images look familiar.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.scores.base import Inputs, Nodes, Training

NAME = "mahalanobis"
METHOD = (
    "Mahalanobis distance of the penultimate features to the nearest class mean, one mean "
    "per class and one shared (pooled within-class) covariance (Lee et al., 2018)"
)
# Ledoit-Wolf's intensity is the rule; this floor only binds when it comes out near 0
# (many images per feature). Every eigenvalue is then at least MIN_SHRINKAGE times the mean
# variance, so the condition number is at most (largest / mean variance) / MIN_SHRINKAGE,
# which keeps the float32 graph within SCORE_RTOL of the float64 reference.
MIN_SHRINKAGE = 1e-3
# The graph's squared distances are float32 sums of terms as large as |z|^2 and |m|^2
# (see add_nodes), so their rounding error scales with those, not with the distance.
# Measured: below 3e-7 of (|z| + max |m|)^2 on both architectures; 30x that is allowed.
SCORE_RTOL = 1e-5


@dataclass(frozen=True)
class Gaussians:
    """Class means and a shared whitening, in float64 (the graph gets float32 copies).

    The features are centred on `center` and whitened by `whitening` (W, with W W^T = the
    inverse of the regularised covariance), so the squared Mahalanobis distance to class k
    is |z - m_k|^2 with z = (x - center) W and m_k the whitened class mean. Centring first
    keeps |z| and |m_k| small (ReLU features are all positive, far from 0), which is what
    the float32 rounding in the graph scales with.
    """

    center: np.ndarray  # [d]
    whitening: np.ndarray  # [d, d]
    means: np.ndarray  # [K, d] whitened, centred class means
    classes: np.ndarray  # [K] the class index of each mean
    regularisation: dict[str, Any]

    def whiten(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.center) @ self.whitening

    def nearest(self, features: np.ndarray, chunk: int = 256) -> np.ndarray:
        """[N] squared distance to the nearest class mean, float64, as the norm of the
        difference (the graph expands it), [chunk, K, d] at a time."""
        z = self.whiten(features)
        out = np.empty(len(z))
        for start in range(0, len(z), chunk):
            block = z[start : start + chunk, None, :] - self.means[None]
            out[start : start + chunk] = (block**2).sum(axis=2).min(axis=1)
        return out

    def rounding(self, features: np.ndarray) -> np.ndarray:
        z = self.whiten(features)
        largest_mean = float(np.sqrt((self.means**2).sum(axis=1).max()))
        return SCORE_RTOL * (np.sqrt((z**2).sum(axis=1)) + largest_mean) ** 2

    def add_nodes(self, graph: Nodes, features: str, name: str) -> str:
        """[B, 1] min_k |z - m_k|^2, opset 17, float32:

            z      = Gemm(features, W, -center W)         [B, d]  one matmul, centred
            cross  = MatMul(z, -2 M^T) + |m_k|^2          [B, K]
            d2     = ReduceMin(cross) + ReduceSumSquare(z) [B, 1]

        |z|^2 is the same for every class, so it is added after the minimum."""
        z = graph.node(
            "Gemm",
            [features, graph.constant(f"{name}_whitening", self.whitening),
             graph.constant(f"{name}_offset", -(self.center @ self.whitening))],
            f"{name}_z",
        )  # fmt: skip
        cross = graph.node(
            "Add",
            [graph.node("MatMul", [z, graph.constant(f"{name}_means_times_minus_two",
                                                     -2 * self.means.T)], f"{name}_zm"),
             graph.constant(f"{name}_mean_norms", (self.means**2).sum(axis=1))],
            f"{name}_cross",
        )  # fmt: skip
        nearest = graph.node("ReduceMin", [cross], f"{name}_nearest", axes=[1])
        z_norm = graph.node("ReduceSumSquare", [z], f"{name}_z_norm", axes=[1])
        return graph.node("Add", [nearest, z_norm], f"{name}_distance")


def gaussians(features: np.ndarray, labels: np.ndarray, *, per_class: bool = True) -> Gaussians:
    """One mean per class (per_class) or one mean for all, and the shared covariance of the
    residuals around them, shrunk (`shrunk_covariance`) and whitened."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("a score needs training images")
    labels = np.asarray(labels).astype(np.int64) if per_class else np.zeros(len(x), np.int64)
    classes, index = np.unique(labels, return_inverse=True)
    class_means = np.stack([x[index == k].mean(axis=0) for k in range(len(classes))])
    covariance, shrinkage, scale = shrunk_covariance(x - class_means[index])
    # eigh, not inv: the regularised covariance is symmetric positive definite, and its
    # eigenvectors scaled by 1/sqrt(eigenvalue) are a whitening W with W W^T = inverse.
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors / np.sqrt(eigenvalues)
    center = class_means.mean(axis=0)
    return Gaussians(
        center=center,
        whitening=whitening,
        means=(class_means - center) @ whitening,
        classes=classes,
        regularisation={
            "method": "Ledoit-Wolf shrinkage of the covariance toward a scaled identity "
            f"(the mean variance times I), intensity at least {MIN_SHRINKAGE:g}",
            "shrinkage": float(shrinkage),
            "identity_scale": float(scale),
            "condition_number": float(eigenvalues.max() / eigenvalues.min()),
        },
    )


def shrunk_covariance(residuals: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(covariance, shrinkage, scale): (1 - a) S + a mu I with S = R^T R / n the covariance
    of the residuals R (features minus their mean), mu its mean variance and a Ledoit and
    Wolf's (2004) estimate of the intensity that minimises the expected squared error,
    floored at MIN_SHRINKAGE.

    Why shrink: with d features and n - K degrees of freedom S is singular whenever a unit
    never fires (dead ReLUs) or n - K < d, and badly conditioned well before that; the
    inverse would then weigh directions that training never saw by 1/0. Shrinkage toward
    mu I keeps every eigenvalue at least a * mu, and Ledoit-Wolf picks `a` from the data
    with no held-out set and no tuning.
    """
    n, d = residuals.shape
    sample = residuals.T @ residuals / n
    scale = float(np.trace(sample)) / d
    if scale <= 0:  # every image equals its class mean: no spread to measure, use Euclid
        return np.eye(d), 1.0, 1.0
    # Ledoit-Wolf in its scaled-Frobenius form (|A|^2 = tr(A A^T) / d):
    #   delta^2 = |S - mu I|^2, how far S is from the target;
    #   beta^2 = (1 / n^2) sum_i |r_i r_i^T - S|^2, how noisy S is, which expands to
    #            (sum_i |r_i|^4 - n |S|_F^2) / (n^2 d) without forming any r_i r_i^T.
    delta2 = float(((sample - scale * np.eye(d)) ** 2).sum()) / d
    beta2 = float(((residuals**2).sum(axis=1) ** 2).sum() - n * (sample**2).sum()) / (n * n * d)
    shrinkage = 1.0 if delta2 <= 0 else min(max(beta2, 0.0), delta2) / delta2
    shrinkage = max(shrinkage, MIN_SHRINKAGE)
    return (1 - shrinkage) * sample + shrinkage * scale * np.eye(d), shrinkage, scale


@dataclass(frozen=True)
class Mahalanobis:
    classes: Gaussians
    name: str = NAME

    def strangeness(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        return self.classes.nearest(inputs.features)

    def rounding(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        return self.classes.rounding(inputs.features)

    def add_nodes(self, graph: Nodes, inputs: Inputs[str]) -> str:
        return self.classes.add_nodes(graph, inputs.features, "class")

    def card(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "classes": len(self.classes.classes),
            "feature_width": len(self.classes.center),
            "regularisation": self.classes.regularisation,
        }


def fit(training: Training) -> Mahalanobis:
    return Mahalanobis(gaussians(training.features, training.labels))
