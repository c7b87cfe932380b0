"""Familiarity with the Mahalanobis score on constructed features, where the right answer is
known: Gaussian class clusters with a shared covariance, run through the ONNX head that
export builds (on a graph whose `features` output is its input) and through the NumPy
reference. What every score shares (the calibration, the rank gate) is tested here on this
score; each score's own computation in tests/test_scores.py."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from contract.modelcard import FAMILIARITY_NAME, FEATURES_NAME, INPUT_NAME
from training import familiarity
from training.export import OPSET
from training.scores import mahalanobis
from training.scores.base import Inputs, Training

WIDTH = 16
CLASSES = 10
# A shared covariance with very unequal spread: sd 8 along the first feature, 0.5 along the
# second, 1 elsewhere. Euclidean distance cannot tell a step along one from a step along
# the other; Mahalanobis distance must.
SD = np.array([8.0, 0.5, *[1.0] * (WIDTH - 2)])


def clusters(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """float32 features: class means well apart (and far from 0, like ReLU features)."""
    means = np.random.default_rng(99).normal(0, 10, (CLASSES, WIDTH)) + 30
    return (means[labels] + rng.normal(0, 1, (len(labels), WIDTH)) * SD).astype(np.float32)


def inputs(features: np.ndarray) -> Inputs:
    """What the Mahalanobis score reads of these images: their features (no pixels)."""
    return Inputs(None, features)


def training(features: np.ndarray, labels: np.ndarray) -> Training:
    """The Mahalanobis score ignores the classifier layer; any kernel and bias will do."""
    kernel = np.random.default_rng(5).normal(0, 0.1, (features.shape[1], 100))
    return Training(features, labels, kernel, np.zeros(100))


@pytest.fixture(scope="module")
def fitted() -> familiarity.Familiarity:
    """Fitted on classes 0-8 only: class 9 plays a class held out of training."""
    rng = np.random.default_rng(0)
    labels = np.arange(4000) % (CLASSES - 1)
    return familiarity.fit(
        training(clusters(rng, labels), labels),
        inputs(clusters(rng, np.arange(1000) % 9)),
        score=mahalanobis.NAME,
    )


def head(fitted: familiarity.Familiarity, width: int = WIDTH) -> ort.InferenceSession:
    """The familiarity head export builds, on a graph whose features are its input (beside
    the images, which this score does not read)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [FEATURES_NAME])],
        "features",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", 32, 32, 3]),
        ],
        [helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, ["batch", width])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    familiarity.add_to_graph(proto, fitted)
    onnx.checker.check_model(proto, full_check=True)  # opset 17 ops, shapes that infer
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def class_means(fitted: familiarity.Familiarity) -> np.ndarray:
    """[K, WIDTH] the fitted class means in feature space (float64)."""
    classes = fitted.score.classes
    return classes.means @ np.linalg.inv(classes.whitening) + classes.center


def at_distance(fitted: familiarity.Familiarity, squared: float) -> np.ndarray:
    """[1, WIDTH] features at exactly this squared distance from class 0's mean (nearer to
    it than to any other), along feature 1."""
    step = np.eye(WIDTH)[1]
    return class_means(fitted)[:1] + step * np.sqrt(squared) / np.linalg.norm(
        step @ fitted.score.classes.whitening
    )


def run(session: ort.InferenceSession, features: np.ndarray) -> np.ndarray:
    images = np.zeros((len(features), 32, 32, 3), np.uint8)
    (values,) = session.run([FAMILIARITY_NAME], {"x": features, INPUT_NAME: images})
    assert values.shape == (len(features), 1) and values.dtype == np.float32
    return values[:, 0]


def test_the_graph_computes_the_reference(fitted):
    rng = np.random.default_rng(1)
    features = np.concatenate(
        [clusters(rng, np.arange(500) % CLASSES), rng.uniform(0, 60, (100, WIDTH))]
    ).astype(np.float32)
    got = run(head(fitted), features)
    assert familiarity.parity_failure(fitted, inputs(features), got[:, None]) is None
    expected = familiarity.familiarity_of(fitted, inputs(features))[:, 0]
    # A rank: off by one validation distance at most, where float32 rounding crosses one.
    assert np.abs(got - expected).max() <= 1 / len(fitted.validation) + 1e-6
    assert (got == expected).mean() > 0.95


def test_validation_images_are_uniform_and_new_images_of_trained_classes_typical(fitted):
    validation = np.random.default_rng(0)  # the fixture's generator, replayed
    clusters(validation, np.arange(4000) % 9)
    val_features = clusters(validation, np.arange(1000) % 9)
    # Calibrated on exactly these: every rank 0, 1/V, ..., (V-1)/V once.
    ranks = np.sort(familiarity.familiarity_of(fitted, inputs(val_features))[:, 0]) * 1000
    np.testing.assert_allclose(ranks, np.arange(1000), atol=1e-3)
    # New images from the same classes: uniform too, up to sampling (Kolmogorov-Smirnov
    # distance to the uniform CDF; 0.06 is about p = 0.001 for 1000 draws).
    fresh = np.sort(run(head(fitted), clusters(np.random.default_rng(2), np.arange(1000) % 9)))
    assert np.abs(fresh - np.arange(1000) / 1000).max() < 0.06


def test_stranger_features_get_low_familiarity(fitted):
    rng = np.random.default_rng(3)
    session = head(fitted)
    held_out = run(session, clusters(rng, np.full(200, CLASSES - 1)))  # a class not fitted
    noise = run(session, rng.uniform(0, 60, (200, WIDTH)).astype(np.float32))
    assert held_out.max() == 0 and noise.max() == 0
    # Halfway between two trained class means: outside both clusters.
    means = class_means(fitted)
    midpoint = ((means[0] + means[1]) / 2)[None].astype(np.float32)
    assert run(session, midpoint)[0] < 0.01


def test_distance_is_mahalanobis_not_euclidean(fitted):
    """Two steps of the same length from a class mean: 4 units along the high-variance
    feature is 0.5 sd, typical; along the low-variance one it is 8 sd, strange."""
    means = class_means(fitted)
    along_wide, along_narrow = means[[0, 0]].copy(), means[[0, 0]].copy()
    along_wide[:, 0] += [4, -4]
    along_narrow[:, 1] += [4, -4]
    session = head(fitted)
    assert run(session, along_wide.astype(np.float32)).min() > 0.5
    assert run(session, along_narrow.astype(np.float32)).max() < 0.01


def test_the_card_says_how_it_was_fitted(fitted):
    card = fitted.card
    assert card["score"] == "mahalanobis" and "Mahalanobis" in card["method"]
    assert card["training_images"] == 4000 and card["validation_images"] == 1000
    assert card["classes"] == CLASSES - 1 and card["feature_width"] == WIDTH
    assert card["classes_without_training_images"] == list(range(CLASSES - 1, 100))
    assert fitted.score.classes.classes.tolist() == list(range(CLASSES - 1))
    assert "Ledoit-Wolf" in card["regularisation"]["method"]
    quantiles = card["validation_strangeness_quantiles"]
    assert list(quantiles) == ["0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99"]
    assert list(quantiles.values()) == sorted(quantiles.values())
    # 16 features, near-exact covariance: the squared distance of a typical image is about
    # a chi-square with 16 degrees of freedom, median 15.3.
    assert 3.5**2 < quantiles["0.5"] < 4.3**2


def test_ledoit_wolf_shrinkage_matches_its_definition():
    """The intensity from the expanded formula equals the textbook one, computed the long
    way (every r r^T formed), and the result always inverts."""
    rng = np.random.default_rng(4)
    for n, d, spread in ((50, 8, np.ones(8)), (40, 30, np.linspace(0.1, 5, 30)), (9, 12, None)):
        residuals = rng.normal(0, 1, (n, d)) * (spread if spread is not None else 1)
        if spread is None:  # fewer images than features, and one unit that never fires
            residuals[:, 3] = 0
        covariance, shrinkage, scale = mahalanobis.shrunk_covariance(residuals)
        sample = residuals.T @ residuals / n
        mu = np.trace(sample) / d
        delta2 = np.sum((sample - mu * np.eye(d)) ** 2) / d
        beta2 = sum(np.sum((np.outer(r, r) - sample) ** 2) / d for r in residuals) / n**2
        expected = max(min(beta2, delta2) / delta2, mahalanobis.MIN_SHRINKAGE)
        assert scale == pytest.approx(mu) and shrinkage == pytest.approx(expected)
        np.testing.assert_allclose(
            covariance, (1 - expected) * sample + expected * mu * np.eye(d), atol=1e-12
        )
        assert np.linalg.eigvalsh(covariance).min() >= expected * mu * (1 - 1e-9)
    # Isotropic noise: the identity target is the truth, so nearly all of it is taken.
    _, shrinkage, _ = mahalanobis.shrunk_covariance(rng.normal(0, 2, (5000, 8)))
    assert shrinkage > 0.9
    # Strong structure, many images: little shrinkage, down to the floor.
    structured = rng.normal(0, 1, (20000, 4)) * [100, 10, 1, 0.1]
    _, shrinkage, _ = mahalanobis.shrunk_covariance(structured)
    assert shrinkage == mahalanobis.MIN_SHRINKAGE


def test_no_spread_at_all_falls_back_to_euclid():
    features = np.repeat(np.eye(3, dtype=np.float32) * 5, 4, axis=0)  # each class one point
    labels = np.repeat(np.arange(3), 4)
    fitted = mahalanobis.fit(training(features, labels))
    np.testing.assert_allclose(fitted.classes.whitening, np.eye(3))
    assert fitted.strangeness(inputs(features[:1] + np.array([1, 0, 0])))[0] == pytest.approx(1)


def test_parity_tolerance_is_one_rank_where_rounding_can_cross_a_distance(fitted):
    """Familiarity is a rank, so the gate allows exactly the ranks that a distance within
    float32 rounding of the reference's would get, and no other."""
    validation = fitted.validation.astype(np.float64)
    v = len(validation)
    # Features whose distance is one validation distance (to float64 precision): the
    # reference ranks it one way, rounding may rank it the other. Both are allowed.
    k = 500
    on = at_distance(fitted, validation[k])
    assert fitted.score.strangeness(inputs(on))[0] == pytest.approx(validation[k], rel=1e-12)
    exact = familiarity.familiarity_of(fitted, inputs(on))
    for rank in ((v - k - 1) / v, (v - k) / v):
        assert (
            familiarity.parity_failure(fitted, inputs(on), np.array([[rank]], np.float32)) is None
        )
    # Ten ranks off there (more than lie within rounding of it), or one rank off at a
    # distance far from any validation distance, is a graph computing something else.
    assert familiarity.parity_failure(fitted, inputs(on), exact - 10 / v) is not None
    gaps = np.diff(validation)
    widest = int(gaps.argmax())
    between = (validation[widest] + validation[widest + 1]) / 2
    off = at_distance(fitted, between)
    exact = familiarity.familiarity_of(fitted, inputs(off))
    assert familiarity.parity_failure(fitted, inputs(off), exact) is None
    for moved in (exact + 1 / v, exact - 1 / v):
        assert "outside what the reference allows" in familiarity.parity_failure(
            fitted, inputs(off), moved
        )
    assert familiarity.parity_failure(fitted, inputs(off), np.full((1, 1), np.nan, np.float32))
    assert "shape" in familiarity.parity_failure(fitted, inputs(off), exact[:, 0])
