"""The pixel statistics score (training/scores/pixels.py): its statistics against values
worked out by hand for images whose answer is known, and its direction: fitted on smooth
photo-like images, noise, flat colour and patterns are stranger."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from training import families
from training.scores import pixels
from training.scores.base import Inputs, Nodes, Training


def column(name: str) -> int:
    return pixels.STATISTICS.index(name)


def smooth_images(count: int, seed: int) -> np.ndarray:
    """Photo-like stand-ins: coloured noise blurred to a few pixels' correlation length,
    with a random contrast and brightness, so neighbouring pixels are alike but not equal."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(0, 1, (count, 32, 32, 3))
    blurred = gaussian_filter(raw, sigma=(0, 1.5, 1.5, 0))
    blurred /= blurred.std(axis=(1, 2, 3), keepdims=True)
    scale = rng.uniform(25, 60, (count, 1, 1, 1))
    return np.clip(rng.uniform(80, 170, (count, 1, 1, 3)) + scale * blurred, 0, 255).astype(
        np.uint8
    )


def fit(images: np.ndarray) -> pixels.Pixels:
    """The score fitted on these images alone (it reads no features)."""
    empty = np.empty((len(images), 0))
    return pixels.fit(Training(empty, np.zeros(len(images)), np.empty((0, 1)), np.zeros(1),
                               images=images))  # fmt: skip


def of(images: np.ndarray) -> Inputs:
    return Inputs(images, np.empty((len(images), 0)))


def test_statistics_of_a_flat_grey_and_a_checkerboard_by_hand():
    grey = np.full((1, 32, 32, 3), 100, np.uint8)
    board = np.where((np.indices((32, 32)).sum(axis=0) % 2)[None, :, :, None] == 1, 255, 0)
    board = np.broadcast_to(board, (1, 32, 32, 3)).astype(np.uint8)
    flat, checked = pixels.statistics(grey)[0], pixels.statistics(board)[0]
    assert flat[column("flat share")] == 1 and flat[column("edge share")] == 0
    assert flat[column("neighbour correlation")] == 1  # no variance: called smooth
    assert flat[column("mean saturation")] == 0 and flat[column("value entropy")] == 0
    assert flat[column("log mean |horizontal difference|")] == pytest.approx(np.log(1e-3))
    # Every neighbour differs by the full range: all edges, correlation -1, two values.
    assert checked[column("edge share")] == 1 and checked[column("flat share")] == 0
    assert checked[column("neighbour correlation")] == pytest.approx(-1)
    assert checked[column("log mean |horizontal difference|")] == pytest.approx(np.log(1.001))
    assert checked[column("value entropy")] == pytest.approx(np.log(2))
    # Every diagonal neighbour has the same colour.
    assert checked[column("log mean |diagonal difference|")] == pytest.approx(np.log(1e-3))


def test_noise_flat_colour_and_patterns_are_stranger_than_photo_like_images():
    fitted = fit(smooth_images(2000, 0))
    known = fitted.strangeness(of(smooth_images(300, 1)))
    photos = smooth_images(50, 2)
    generated = families.generate(100, 0, photos)
    for name in ("uniform noise", "salt-and-pepper noise", "flat colour", "checkerboards",
                 "stripes", "text"):  # fmt: skip
        other = fitted.strangeness(of(generated[name]))
        auroc = roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(other))], np.r_[known, other])
        assert auroc > 0.95, name
    assert fitted.card()["statistics"] == list(pixels.STATISTICS)


def test_the_graph_computes_the_statistics_and_the_score_of_the_reference():
    """The ONNX nodes on the uint8 input, run by onnxruntime in float32, against the
    float64 reference, on photo-like images and on every family (flat images included:
    the logarithms' floor and the correlation's flat case); and the score within the
    rounding band the reference allows it (what the export's parity gate holds it to)."""
    fitted = fit(smooth_images(500, 0))
    photos = smooth_images(30, 3)
    images = np.concatenate([photos, *families.generate(8, 1, photos).values()])
    nodes = Nodes("pixels/")
    statistics = pixels.statistics_nodes(nodes.within("stats/"), "images")
    score = fitted.add_nodes(nodes, Inputs("images", "features"))  # reads no features
    graph = helper.make_graph(
        nodes.nodes, "pixels",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 32, 32, 3])],
        [helper.make_tensor_value_info(statistics, TensorProto.FLOAT, ["batch", 12]),
         helper.make_tensor_value_info(score, TensorProto.FLOAT, ["batch", 1])],
        nodes.initializers,
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got_statistics, got_score = session.run(None, {"images": images})
    # float32 leaves a flat image a standard deviation of about 1e-6 (its mean rounded),
    # which moves log(1e-3 + std) by about 1e-3: the one difference above float32's own.
    np.testing.assert_allclose(got_statistics, pixels.statistics(images), rtol=1e-4, atol=2e-3)
    reference = fitted.strangeness(of(images))
    np.testing.assert_allclose(got_score[:, 0], reference, rtol=1e-3, atol=1e-2)
    band = fitted.rounding(of(images))
    assert np.all(np.abs(got_score[:, 0] - reference) <= band)
    # A band, not a licence: far narrower than the scores it bounds, on photos too
    # (measured: a median of 1.4 % of the score on the photos).
    assert np.median(band / reference) < 0.05
    assert np.median(band[: len(photos)] / reference[: len(photos)]) < 0.05
