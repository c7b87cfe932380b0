"""Each strangeness score against an independent computation (the formula written out the
long way, with scipy and sklearn), and its ONNX nodes against its own reference through
the calibration every score shares (tests/test_familiarity.py tests that on one score)."""

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from sklearn.covariance import ledoit_wolf
from sklearn.metrics import roc_auc_score

from contract.modelcard import FAMILIARITY_NAME
from tests.test_familiarity import head
from training import familiarity
from training.scores import DEFAULT, SCORES, combined, mahalanobis
from training.scores.base import Training

WIDTH = 24
CLASSES = 12


def features_of(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """ReLU-like features: class clusters with correlated, unequal spread, far from 0."""
    means = np.random.default_rng(7).normal(0, 3, (CLASSES, WIDTH)) + 6
    mixing = np.random.default_rng(8).normal(0, 1, (WIDTH, WIDTH)) / np.sqrt(WIDTH)
    noise = rng.normal(0, 1, (len(labels), WIDTH)) @ mixing * np.linspace(0.3, 3, WIDTH)
    return np.maximum(means[labels] + noise, 0).astype(np.float32)


@pytest.fixture(scope="module")
def training() -> Training:
    """Features of CLASSES - 1 classes (the last one never trained), and a classifier layer
    whose logits range over tens, as a trained one's do."""
    rng = np.random.default_rng(0)
    labels = np.arange(3000) % (CLASSES - 1)
    kernel = rng.normal(0, 0.5, (WIDTH, 100))
    return Training(features_of(rng, labels), labels, kernel, rng.normal(0, 1, 100))


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    """Images of trained classes, of the untrained one, noise, and extremes: large
    activations and all-zero features (a black image can give those)."""
    rng = np.random.default_rng(1)
    return np.concatenate(
        [
            features_of(rng, np.arange(400) % CLASSES),
            rng.uniform(0, 20, (100, WIDTH)),
            rng.uniform(0, 200, (20, WIDTH)),
            np.zeros((2, WIDTH)),
        ]
    ).astype(np.float32)


def long_way(name: str, training: Training, x: np.ndarray) -> np.ndarray:
    """Each score from its paper's formula: covariances from sklearn's Ledoit-Wolf (same
    estimator, independent code), distances as (x - m)^T S^-1 (x - m) image by image,
    logits, softmax and log-sum-exp from scipy; a combination from its two scores' long
    ways, each through np.interp over the training images' score quantiles."""
    if ":" in name:
        how, pair = name.split(":")
        shares = []
        for part in pair.split(","):
            positions = (np.arange(combined.QUANTILES) + 0.5) / combined.QUANTILES
            train = long_way(part, training, training.features)
            q = np.unique(np.quantile(train, positions).astype(np.float32)).astype(np.float64)
            values = long_way(part, training, x).astype(np.float32).astype(np.float64)
            tail = np.maximum(values - q[-1], 0) / (q[-1] - q[0])
            shares.append(np.interp(values, q, np.linspace(0, 1, len(q))) + tail)
        return np.maximum(*shares) if how == "either" else (shares[0] + shares[1]) / 2
    x = x.astype(np.float64)
    feats, labels = training.features.astype(np.float64), training.labels
    classes = np.unique(labels)

    def inverse_covariance(residuals: np.ndarray) -> np.ndarray:
        covariance, shrinkage = ledoit_wolf(residuals, assume_centered=True)
        if shrinkage < mahalanobis.MIN_SHRINKAGE:
            mu = np.trace(residuals.T @ residuals / len(residuals)) / residuals.shape[1]
            sample = residuals.T @ residuals / len(residuals)
            covariance = (1 - mahalanobis.MIN_SHRINKAGE) * sample + (
                mahalanobis.MIN_SHRINKAGE * mu * np.eye(len(sample))
            )
        return np.linalg.inv(covariance)

    def distance(point: np.ndarray, mean: np.ndarray, inverse: np.ndarray) -> float:
        return float((point - mean) @ inverse @ (point - mean))

    means = {k: feats[labels == k].mean(axis=0) for k in classes}
    residuals = np.concatenate([feats[labels == k] - means[k] for k in classes])
    within = inverse_covariance(residuals)
    nearest = np.array([min(distance(p, means[k], within) for k in classes) for p in x])
    if name == "mahalanobis":
        return nearest
    if name == "relative_mahalanobis":
        center = feats.mean(axis=0)
        background = inverse_covariance(feats - center)
        return nearest - np.array([distance(p, center, background) for p in x])
    logits = x @ training.kernel + training.bias
    if name == "energy":
        return -logsumexp(logits, axis=1)
    if name == "gen":
        # 1 - p as the sum of the other classes' probabilities, each from its own
        # log-sum-exp: 1 - p itself cancels to 0 for a p within 1e-16 of 1.
        p = softmax(logits, axis=1)
        others = np.concatenate([
            np.exp(logsumexp(block[:, None, :], axis=2, b=1 - np.eye(block.shape[1]))
                   - logsumexp(block, axis=1, keepdims=True))
            for block in np.array_split(logits, max(1, len(logits) // 256))
        ])  # fmt: skip
        return (p**0.1 * others**0.1).sum(axis=1)
    raise AssertionError(f"no long-way formula for {name}: add one with the score")


@pytest.mark.parametrize("name", SCORES)
def test_the_reference_is_the_papers_formula(name, training, probes):
    got = SCORES[name](training).strangeness(probes)
    expected = long_way(name, training, probes)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9 * scale)


@pytest.mark.parametrize("name", SCORES)
def test_the_graph_computes_the_reference_through_the_calibration(name, training, probes):
    rng = np.random.default_rng(2)
    val = features_of(rng, np.arange(2000) % (CLASSES - 1))
    fitted = familiarity.fit(training, val, score=name)
    assert fitted.card["score"] == name and fitted.card["method"]
    (got,) = head(fitted, WIDTH).run([FAMILIARITY_NAME], {"x": probes})
    assert familiarity.parity_failure(fitted, probes, got) is None
    exact = familiarity.familiarity_of(fitted, probes)
    # Mostly exact; where not, within the rank band (parity_failure above), whose width
    # the next test keeps small.
    assert (got == exact).mean() > 0.9
    # Calibration: validation images get each rank 0, 1/V, ..., (V-1)/V once (ties aside),
    # so a floor t refuses a share t of them.
    ranks = np.sort(familiarity.familiarity_of(fitted, val)[:, 0]) * len(val)
    assert np.abs(ranks - np.arange(len(val))).max() <= 1 + 1e-3
    # A graph that computes anything else fails the gate: half a rank band is not slack.
    assert familiarity.parity_failure(fitted, probes, np.roll(got, 1)) is not None


@pytest.mark.parametrize("name", SCORES)
def test_the_rounding_band_is_narrow_enough_to_mean_something(name, training, probes):
    """A band wide enough to hold every validation score would pass any graph: on trained
    classes' images it must cover at most 1 % of the validation images (typically: 0 to 1
    for energy and GEN, 5 for Mahalanobis, 9 for relative Mahalanobis, of 2000)."""
    rng = np.random.default_rng(3)
    fitted = familiarity.fit(training, features_of(rng, np.arange(2000) % 11), score=name)
    lowest, highest = familiarity.rank_bounds(fitted, probes[:400])
    assert np.median(highest - lowest) <= 0.01


@pytest.fixture(scope="module")
def classifying() -> Training:
    """The training features with a classifier layer that classifies them: linear
    discriminant analysis (shared covariance) of the CLASSES - 1 trained classes, written
    out here; the other columns of the 100 are never the answer (bias -30). The output
    scores (energy, GEN) can only rank an untrained class stranger where the classifier
    has learnt the trained ones, which `training`'s random layer has not."""
    rng = np.random.default_rng(0)
    labels = np.arange(3000) % (CLASSES - 1)
    features = features_of(rng, labels)
    x = features.astype(np.float64)
    means = np.stack([x[labels == k].mean(axis=0) for k in range(CLASSES - 1)])
    residuals = x - means[labels]
    inverse = np.linalg.inv(residuals.T @ residuals / len(x))
    kernel, bias = np.zeros((WIDTH, 100)), np.full(100, -30.0)
    kernel[:, : CLASSES - 1] = inverse @ means.T
    bias[: CLASSES - 1] = -0.5 * np.einsum("kd,de,ke->k", means, inverse, means)
    return Training(features, labels, kernel, bias)


@pytest.mark.parametrize("name", SCORES)
def test_the_untrained_class_is_stranger_than_the_trained_ones(name, classifying):
    """Every score and every combination: images of the class never trained are ranked
    stranger than images of trained classes (AUROC from sklearn on the raw score, and the
    calibrated familiarity's medians): a score computing nonsense, or its sign flipped,
    would not."""
    rng = np.random.default_rng(4)
    val = features_of(rng, np.arange(1000) % (CLASSES - 1))
    known = features_of(rng, np.arange(500) % (CLASSES - 1))
    unknown = features_of(rng, np.full(500, CLASSES - 1))
    fitted = familiarity.fit(classifying, val, score=name)
    strangeness = np.r_[fitted.score.strangeness(known), fitted.score.strangeness(unknown)]
    assert roc_auc_score(np.r_[np.zeros(500), np.ones(500)], strangeness) > 0.9
    assert np.median(familiarity.familiarity_of(fitted, unknown)) < 0.1
    assert np.median(familiarity.familiarity_of(fitted, known)) > 0.3


def test_the_default_is_a_score_and_unknown_scores_are_refused(training):
    assert DEFAULT in SCORES
    with pytest.raises(ValueError, match="unknown familiarity score 'knn'"):
        familiarity.fit(training, training.features, score="knn")
