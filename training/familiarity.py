"""Familiarity: how much an image's features look like the training data's, as a graph output.

The score (Lee et al., 2018, "A Simple Unified Framework for Detecting Out-of-Distribution
Samples and Adversarial Attacks"): fit one mean per class and one shared covariance to the
penultimate activations of the training images; an image's score is its Mahalanobis
distance to the nearest class mean. A raw distance means nothing to a client (its scale
depends on the model and the feature width), so it is calibrated on the validation images:

    familiarity(x) = share of validation images whose distance is larger than x's

0.01 means stranger than 99 % of the validation set; on validation data it is uniform on
{0, 1/V, ..., (V-1)/V}. Everything the formula needs (means, a whitening matrix, the
sorted validation distances) is a constant, so the export builds it into the ONNX graph
as a third output computed from the `features` output: the service, Triton and any other
onnxruntime get it with no code of their own.

This module has three parts, top-down: `fit` (NumPy, float64), the NumPy reference
(`distances`, `familiarity_of`, and `parity_failure`, which the export's gate runs) and
`add_to_graph` (the ONNX nodes, float32, opset 17).
"""

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.modelcard import FAMILIARITY_NAME, FEATURES_NAME, NUM_CLASSES

METHOD = (
    "Mahalanobis distance of the penultimate features to the nearest class mean, one mean "
    "per class and one shared (pooled within-class) covariance (Lee et al., 2018); "
    "familiarity = share of validation images whose distance is larger"
)
# Ledoit-Wolf's intensity is the rule; this floor only binds when it comes out near 0
# (many images per feature). Every eigenvalue is then at least MIN_SHRINKAGE times the mean
# variance, so the condition number is at most (largest / mean variance) / MIN_SHRINKAGE,
# which keeps the float32 graph within SCORE_RTOL of the float64 reference.
MIN_SHRINKAGE = 1e-3
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# The graph's squared distances are float32 sums of terms as large as |z|^2 and |m|^2
# (see add_to_graph), so their rounding error scales with those, not with the distance.
# Measured: below 3e-7 of (|z| + max |m|)^2 on both architectures; 30x that is allowed.
SCORE_RTOL = 1e-5
# ReduceMean divides a float32 count by V: one rounding, far below 1/V.
MEAN_ATOL = 1e-6
PREFIX = "familiarity/"  # every name this module adds to a graph, apart from the output


@dataclass(frozen=True)
class Familiarity:
    """What `fit` learned: all the score needs, in float64 (the graph gets float32 copies).

    The features are centred on `center` (the mean of the class means) and whitened by
    `whitening` (W, with W W^T = the inverse of the regularised covariance), so the squared
    Mahalanobis distance to class k is |z - m_k|^2 with z = (x - center) W and m_k the
    whitened class mean. Centring first keeps |z| and |m_k| small (ReLU features are all
    positive, far from 0), which is what the float32 rounding in the graph scales with.
    """

    center: np.ndarray  # [d]
    whitening: np.ndarray  # [d, d]
    means: np.ndarray  # [K, d] whitened, centred class means
    classes: np.ndarray  # [K] the class index of each mean
    validation_distances: np.ndarray  # [V] squared distances, ascending, float32 as stored
    card: dict[str, Any]  # ModelCard.familiarity: how it was fitted and calibrated


def fit(
    train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray
) -> Familiarity:
    """Class means and the shared covariance from the training features, the calibration
    from the validation features. Only classes with training images get a mean: a run that
    held classes out of training must not have their images look familiar."""
    x = np.asarray(train_features, dtype=np.float64)
    labels = np.asarray(train_labels).astype(np.int64)
    if len(x) == 0 or len(val_features) == 0:
        raise ValueError("familiarity needs training and validation images")
    classes, index = np.unique(labels, return_inverse=True)
    class_means = np.stack([x[index == k].mean(axis=0) for k in range(len(classes))])
    residuals = x - class_means[index]
    covariance, shrinkage, scale = shrunk_covariance(residuals)
    # eigh, not inv: the regularised covariance is symmetric positive definite, and its
    # eigenvectors scaled by 1/sqrt(eigenvalue) are a whitening W with W W^T = inverse.
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    whitening = eigenvectors / np.sqrt(eigenvalues)
    center = class_means.mean(axis=0)
    partial = Familiarity(
        center=center,
        whitening=whitening,
        means=(class_means - center) @ whitening,
        classes=classes,
        validation_distances=np.zeros(0, dtype=np.float32),
        card={},
    )
    # Stored as the graph stores them: float32, sorted (the graph needs no sorting, but a
    # reader of the file, and the reference's searchsorted, do).
    validation = np.sort(distances(partial, val_features)).astype(np.float32)
    card = {
        "method": METHOD,
        "training_images": len(x),
        "classes": len(classes),
        "classes_without_training_images": sorted(set(range(NUM_CLASSES)) - set(classes.tolist())),
        "validation_images": len(validation),
        "feature_width": x.shape[1],
        "regularisation": {
            "method": "Ledoit-Wolf shrinkage of the pooled within-class covariance toward "
            "a scaled identity (the mean variance times I), intensity at least "
            f"{MIN_SHRINKAGE:g}",
            "shrinkage": float(shrinkage),
            "identity_scale": float(scale),
            "condition_number": float(eigenvalues.max() / eigenvalues.min()),
        },
        # Of the distance itself (not squared): what "a typical validation image" scores.
        "validation_distance_quantiles": {
            f"{q:g}": float(np.sqrt(np.quantile(validation.astype(np.float64), q)))
            for q in QUANTILES
        },
    }
    return replace(partial, validation_distances=validation, card=card)


def shrunk_covariance(residuals: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(covariance, shrinkage, scale): (1 - a) S + a mu I with S = R^T R / n the pooled
    within-class covariance of the residuals R (features minus their class mean), mu its
    mean variance and a Ledoit and Wolf's (2004) estimate of the intensity that minimises
    the expected squared error, floored at MIN_SHRINKAGE.

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


# The NumPy reference. Independent of the graph in how it computes: float64, the distance
# as the norm of the difference |z - m_k|^2 (the graph expands it), ranks by binary search
# (the graph compares against every validation distance).


def distances(familiarity: Familiarity, features: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[N] squared Mahalanobis distance to the nearest class mean, float64. Squared:
    familiarity is a rank, the same for any increasing function of the distance."""
    z = (np.asarray(features, dtype=np.float64) - familiarity.center) @ familiarity.whitening
    out = np.empty(len(z))
    for start in range(0, len(z), chunk):  # [chunk, K, d] at a time, not [N, K, d]
        block = z[start : start + chunk, None, :] - familiarity.means[None]
        out[start : start + chunk] = (block**2).sum(axis=2).min(axis=1)
    return out


def familiarity_of(familiarity: Familiarity, features: np.ndarray) -> np.ndarray:
    """[N, 1] float32: the share of validation distances strictly larger than each image's."""
    return ranks_above(familiarity.validation_distances, distances(familiarity, features))


def ranks_above(validation: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[N, 1] float32: for each score, the share of the sorted `validation` above it.

    Scores are rounded to float32 first, as the graph's are: a validation image's own
    distance then ties with its stored float32 copy instead of landing on either side of
    it, and the reference gives the validation set exactly the ranks 0, 1/V, ..., (V-1)/V.
    """
    scores = np.asarray(scores).astype(np.float32)
    above = len(validation) - np.searchsorted(validation, scores, side="right")
    return (above / len(validation)).astype(np.float32)[:, None]


def parity_failure(
    familiarity: Familiarity, features: np.ndarray, onnx_familiarity: np.ndarray
) -> str | None:
    """What is wrong with the graph's familiarity for these features (the graph's own
    `features` output, checked against Keras separately), or None.

    Familiarity is a rank: a distance that float32 rounding moves past one validation
    distance moves the answer by a whole 1/V, so a plain absolute tolerance is either too
    tight (fails on a correct graph where validation distances are dense) or too loose
    (lets a wrong one through where they are sparse). Instead the reference distance gets
    a rounding band, SCORE_RTOL * (|z| + max |m_k|)^2 either way, and the graph's answer
    must be a rank that some distance in that band has: between the share of validation
    distances above the band's top and the share above its bottom (plus MEAN_ATOL for the
    division). Outside it, the graph does not compute this score.
    """
    onnx_familiarity = np.asarray(onnx_familiarity)
    if onnx_familiarity.shape != (len(features), 1):
        return f"familiarity has shape {onnx_familiarity.shape}, expected ({len(features)}, 1)"
    lowest, highest = rank_bounds(familiarity, features)
    lowest, highest = lowest - MEAN_ATOL, highest + MEAN_ATOL
    got = onnx_familiarity[:, 0]
    outside = ~((lowest <= got) & (got <= highest))  # a NaN is outside too
    validation = familiarity.validation_distances
    exact = familiarity_of(familiarity, features)[:, 0]
    print(
        f"Familiarity parity on {len(got)} images: max |onnx - reference| = "
        f"{float(np.abs(got - exact).max()):.2e} ({len(validation)} validation distances), "
        f"{int(outside.sum())} outside the rounding band",
        flush=True,
    )
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        return (
            f"familiarity of {int(outside.sum())} image(s) outside what the reference allows, "
            f"e.g. image {i}: {float(got[i]):.6f}, expected {lowest[i] + MEAN_ATOL:.6f} to "
            f"{highest[i] - MEAN_ATOL:.6f}"
        )
    return None


def rank_bounds(familiarity: Familiarity, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N] lowest and highest familiarity that float32 rounding of these features'
    distances can give (see `parity_failure`): equal where no validation distance lies
    within the rounding band, so any correct float32 computation gives that exact value."""
    score = distances(familiarity, features)
    z = (np.asarray(features, dtype=np.float64) - familiarity.center) @ familiarity.whitening
    largest_mean = float(np.sqrt((familiarity.means**2).sum(axis=1).max()))
    band = SCORE_RTOL * (np.sqrt((z**2).sum(axis=1)) + largest_mean) ** 2
    validation = familiarity.validation_distances
    return ranks_above(validation, score + band)[:, 0], ranks_above(validation, score - band)[:, 0]


# The graph.


def add_to_graph(proto: onnx.ModelProto, familiarity: Familiarity) -> None:
    """Append the familiarity head to `proto` (in place): FAMILIARITY_NAME, float32
    [batch, 1], computed from the FEATURES_NAME output. Opset 17 ops, float32:

        z      = Gemm(features, W, -center W)                  [B, d]  one matmul, centred
        cross  = MatMul(z, -2 M^T) + |m_k|^2                   [B, K]
        d2     = ReduceMin(cross) + ReduceSumSquare(z)         [B, 1]  min_k |z - m_k|^2
        answer = ReduceMean(Cast(Less(d2, validation)))        [B, 1]

    |z|^2 is the same for every class, so it is added after the minimum, over [B, 1]
    instead of [B, K]. The comparison is [B, V]: a few hundred thousand compares for a
    batch, cheaper than anything a sort-free binary search would save in ONNX.
    """
    graph = proto.graph
    taken = {name for node in graph.node for name in node.output}
    taken |= {i.name for i in graph.initializer} | {o.name for o in graph.output}
    if any(name.startswith(PREFIX) for name in taken) or FAMILIARITY_NAME in taken:
        raise ValueError(f"the graph already has {FAMILIARITY_NAME} nodes")
    if FEATURES_NAME not in {o.name for o in graph.output}:
        raise ValueError(f"the graph has no {FEATURES_NAME!r} output to compute it from")

    def name(short: str) -> str:
        return PREFIX + short

    whitening = familiarity.whitening
    constants = {
        "whitening": whitening,
        "offset": -(familiarity.center @ whitening),
        "means_times_minus_two": -2 * familiarity.means.T,
        "mean_norms": (familiarity.means**2).sum(axis=1),
        "validation_distances": familiarity.validation_distances,
    }
    graph.initializer.extend(
        numpy_helper.from_array(np.asarray(value, dtype=np.float32), name(key))
        for key, value in constants.items()
    )
    graph.node.extend(
        [
            helper.make_node(
                "Gemm", [FEATURES_NAME, name("whitening"), name("offset")], [name("z")]
            ),
            helper.make_node("MatMul", [name("z"), name("means_times_minus_two")], [name("zm")]),
            helper.make_node("Add", [name("zm"), name("mean_norms")], [name("cross")]),
            helper.make_node("ReduceMin", [name("cross")], [name("nearest")], axes=[1]),
            helper.make_node("ReduceSumSquare", [name("z")], [name("z_norm")], axes=[1]),
            helper.make_node("Add", [name("nearest"), name("z_norm")], [name("distance")]),
            # Less(d2, v): validation image v is stranger than this one.
            helper.make_node(
                "Less", [name("distance"), name("validation_distances")], [name("stranger")]
            ),
            helper.make_node(
                "Cast", [name("stranger")], [name("stranger_float")], to=TensorProto.FLOAT
            ),
            helper.make_node("ReduceMean", [name("stranger_float")], [FAMILIARITY_NAME], axes=[1]),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info(FAMILIARITY_NAME, TensorProto.FLOAT, ["batch", 1])
    )
