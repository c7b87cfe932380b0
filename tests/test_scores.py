"""Each strangeness score against an independent computation (the formula written out the
long way, with scipy and sklearn), and its ONNX nodes against its own reference through
the calibration every score shares (tests/test_familiarity.py tests that on one score).
Every image has pixels and features: each score reads what it needs of them."""

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from sklearn.covariance import ledoit_wolf
from sklearn.metrics import roc_auc_score

from contract.modelcard import FAMILIARITY_NAME, INPUT_NAME
from tests.test_familiarity import head
from tests.test_pixels import smooth_images
from training import familiarity, families
from training.scores import DEFAULT, SCORES, combined, mahalanobis, pixels
from training.scores.base import Inputs, Training

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
    return Training(features_of(rng, labels), labels, kernel, rng.normal(0, 1, 100),
                    images=smooth_images(3000, 10))  # fmt: skip


@pytest.fixture(scope="module")
def probes() -> Inputs:
    """Images of trained classes, of the untrained one, noise, and extremes: large
    activations and all-zero features (a black image can give those); photo-like pixels
    for the classes, every generated family's (noise, flat colour, patterns) for the rest."""
    rng = np.random.default_rng(1)
    features = np.concatenate(
        [
            features_of(rng, np.arange(400) % CLASSES),
            rng.uniform(0, 20, (100, WIDTH)),
            rng.uniform(0, 200, (20, WIDTH)),
            np.zeros((2, WIDTH)),
        ]
    ).astype(np.float32)
    generated = np.concatenate(list(families.generate(6, 0, smooth_images(20, 11)).values()))
    return Inputs(np.concatenate([smooth_images(400, 12), generated[:122]]), features)


def with_images(features: np.ndarray, seed: int) -> Inputs:
    """Features with photo-like pixels."""
    return Inputs(smooth_images(len(features), seed), features)


def long_way(name: str, training: Training, inputs: Inputs) -> np.ndarray:
    """Each score from its paper's formula: covariances from sklearn's Ledoit-Wolf (same
    estimator, independent code), distances as (x - m)^T S^-1 (x - m) image by image,
    logits, softmax and log-sum-exp from scipy; the pixels' the same on the statistics
    (tests/test_pixels.py checks those by hand); a combination from its two scores' long
    ways, each through np.interp over the training images' score quantiles."""
    if ":" in name:
        how, pair = name.split(":")
        shares = []
        for part in pair.split(","):
            positions = (np.arange(combined.QUANTILES) + 0.5) / combined.QUANTILES
            train = long_way(part, training, training.inputs)
            q = np.unique(np.quantile(train, positions).astype(np.float32)).astype(np.float64)
            values = long_way(part, training, inputs).astype(np.float32).astype(np.float64)
            tail = np.maximum(values - q[-1], 0) / (q[-1] - q[0])
            shares.append(np.interp(values, q, np.linspace(0, 1, len(q))) + tail)
        return np.maximum(*shares) if how == "either" else (shares[0] + shares[1]) / 2
    x = inputs.features.astype(np.float64)
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

    if name == "pixels":
        known = pixels.statistics(training.images)
        inverse = inverse_covariance(known - known.mean(axis=0))
        points = pixels.statistics(inputs.images)
        return np.array([distance(p, known.mean(axis=0), inverse) for p in points])
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
    val = with_images(features_of(rng, np.arange(2000) % (CLASSES - 1)), 13)
    fitted = familiarity.fit(training, val, score=name)
    assert fitted.card["score"] == name and fitted.card["method"]
    feed = {"x": probes.features, INPUT_NAME: probes.images}
    (got,) = head(fitted, WIDTH).run([FAMILIARITY_NAME], feed)
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
    for energy and GEN, 5 for Mahalanobis, 9 for relative Mahalanobis, of 2000), 2 % for
    the scores that read pixels (29 for the pixels' score, 20 to 27 for its combinations:
    the bound adds up twelve statistics' errors, each 10x the largest measured, through
    the whitening, on photo-like images whose scores lie close together)."""
    rng = np.random.default_rng(3)
    val = with_images(features_of(rng, np.arange(2000) % 11), 14)
    fitted = familiarity.fit(training, val, score=name)
    lowest, highest = familiarity.rank_bounds(fitted, probes.take(slice(0, 400)))
    assert np.median(highest - lowest) <= (0.02 if pixels.NAME in name else 0.01)


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
    return Training(features, labels, kernel, bias, images=smooth_images(3000, 10))


@pytest.mark.parametrize("name", SCORES)
def test_the_untrained_class_is_stranger_than_the_trained_ones(name, classifying):
    """Every score and every combination: images of the class never trained are ranked
    stranger than images of trained classes (AUROC from sklearn on the raw score, and the
    calibrated familiarity's medians): a score computing nonsense, or its sign flipped,
    would not. The untrained class's pixels are uniform noise, the trained classes'
    photo-like: the pixels' score has no classes to go by."""
    rng = np.random.default_rng(4)
    val = with_images(features_of(rng, np.arange(1000) % (CLASSES - 1)), 15)
    known = with_images(features_of(rng, np.arange(500) % (CLASSES - 1)), 16)
    noise = rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8)
    unknown = Inputs(noise, features_of(rng, np.full(500, CLASSES - 1)))
    fitted = familiarity.fit(classifying, val, score=name)
    strangeness = np.r_[fitted.score.strangeness(known), fitted.score.strangeness(unknown)]
    assert roc_auc_score(np.r_[np.zeros(500), np.ones(500)], strangeness) > 0.9
    assert np.median(familiarity.familiarity_of(fitted, unknown)) < 0.1
    assert np.median(familiarity.familiarity_of(fitted, known)) > 0.3


def test_the_default_is_a_score_and_unknown_scores_are_refused(training):
    assert DEFAULT in SCORES
    with pytest.raises(ValueError, match="unknown familiarity score 'knn'"):
        familiarity.fit(training, training.inputs, score="knn")
