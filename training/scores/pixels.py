"""How unlike a photograph an image's pixels are, whatever the network makes of them.

Noise, flat colour, gradients, gratings, checkerboards, text and drawn shapes differ from
photos before any feature is computed: in how neighbouring pixels differ (noise: large and
uncorrelated; flat colour and gradients: nothing; text, shapes, checkerboards: nothing or a
jump, rarely in between), in their colours (few, or unsaturated) and in how their values
spread. `statistics` measures that per image, `fit` fits one Gaussian to the training
photos' statistics (mean and Ledoit-Wolf covariance, as the Mahalanobis score fits the
features), and the strangeness is the squared Mahalanobis distance from it.

This score reads the uint8 images (`Inputs.images`), not the penultimate features: a
network can map noise or a flat colour close to a class's features, but it cannot make
their pixels look like a photo's. `add_nodes` builds it as ONNX nodes on the graph's
uint8 input (float32, opset 17), checked against this reference by tests/test_pixels.py;
`rounding` bounds how far float32 moves it, statistic by statistic, through the whitening.
Alone it knows nothing of the classes, so the export combines it with a score on the
classifier's outputs (`training.scores.PAIRS`), as measured by `python -m training ood`.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto

from training.scores.base import Inputs, Nodes, Training
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
# How far float32 moves each statistic (the graph against `statistics`, measured on 2,000
# test photos, the validation photos and 200 images of each generated family): at most
# 3.4e-6 on any statistic, apart from the three that divide by a spread. 10x that.
STAT_ATOL = 3e-5
# The logarithm of a standard deviation s moves by its error over EPSILON + s. The mean
# the values are centred on is off by some d in float32, which makes the computed s
# sqrt(s^2 + d^2): off by at most min(d, d^2 / 2s), and by at most STD_RTOL of s for the
# sums. Measured: d at most 2.1e-6 (a flat image's s, which should be 0), the error of
# the logarithm on images with spread at most 9.3e-6. Each 10x that.
STD_ATOL = 2e-5
STD_RTOL = 1e-4
# The correlation divides by the grey variance v: its error times sqrt(v) measured at most
# 3.0e-7. 10x that. Where v is 0 (flat), the graph's centred values are one rounded
# constant, whose correlation with itself is 1, as the reference's flat case.
CORRELATION_ATOL = 3e-6
# The whitening (a Gemm) and the sum of squares: a few float32 roundings of their terms.
SCORE_RTOL = 1e-6


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

    def strangeness(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        """[N] float64: squared Mahalanobis distance of the images' statistics."""
        z = (statistics(inputs.images) - self.center) @ self.whitening
        return (z**2).sum(axis=1)

    def rounding(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        """Each statistic's float32 error (`statistic_errors`) moves each whitened
        coordinate z_j by at most b_j = sum_i e_i |W_ij| (plus the Gemm's own rounding),
        and |z|^2 by at most sum_j 2 |z_j| b_j + b_j^2."""
        values = statistics(inputs.images)
        z = (values - self.center) @ self.whitening
        terms = np.abs(values) @ np.abs(self.whitening) + np.abs(self.center @ self.whitening)
        b = statistic_errors(inputs.images, values) @ np.abs(self.whitening)
        b = b + SCORE_RTOL * terms
        return (2 * np.abs(z) * b + b**2).sum(axis=1) + SCORE_RTOL * (z**2).sum(axis=1)

    def card(self) -> dict[str, Any]:
        return {"method": METHOD, "statistics": list(STATISTICS), "shrinkage": self.shrinkage}

    def add_nodes(self, graph: Nodes, inputs: Inputs[str]) -> str:
        """[B, 1] strangeness from the uint8 [B, 32, 32, 3] input `inputs.images`, float32."""
        stats = statistics_nodes(graph, inputs.images)
        z = graph.node(
            "Gemm",
            [stats, graph.constant("whitening", self.whitening),
             graph.constant("offset", -(self.center @ self.whitening))],
            "z",
        )  # fmt: skip
        return graph.node("ReduceSumSquare", [z], "distance", axes=[1])


def statistic_errors(images: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[N, len(STATISTICS)]: how far float32 can move each of `values` (the images'
    `statistics`): STAT_ATOL, more for the two logarithms of a spread and the correlation,
    which divide by one (see their constants)."""
    errors = np.full(values.shape, STAT_ATOL)
    for name in ("log std of differences", "log pixel std"):
        spread = np.exp(values[:, STATISTICS.index(name)]) - EPSILON
        centring = np.minimum(STD_ATOL, STD_ATOL**2 / np.maximum(2 * spread, 1e-300))
        errors[:, STATISTICS.index(name)] += (centring + STD_RTOL * spread) / (EPSILON + spread)
    grey = np.asarray(images, np.float64).mean(axis=3) / 255.0
    variance = ((grey - grey.mean(axis=(1, 2), keepdims=True)) ** 2).mean(axis=(1, 2))
    moved = CORRELATION_ATOL / np.sqrt(np.where(variance > 0, variance, np.inf))
    errors[:, STATISTICS.index("neighbour correlation")] += np.minimum(moved, 2)
    return errors


def statistics_nodes(graph: Nodes, images: str) -> str:
    """[B, len(STATISTICS)] float32: `statistics` as ONNX nodes, in the same order. The
    thresholds sit half a grey level from any difference of two uint8 values, and the
    histogram's bin edges at least 1/255 of a bin from any value, so float32 counts the
    same pixels as the float64 reference."""
    one = 1.0 / 255.0
    # Through int32 (exact) and divided by 255: a Cast of the input to float and a Mul by
    # 1/255 are what the network's first layer does, and graph optimisers merge identical
    # nodes and constants (the int8 quantizer's preparation does), which would hand these
    # statistics the network's quantized copy of the pixels. A path of its own keeps them
    # float (and the division is the reference's, correctly rounded).
    whole = graph.node("Cast", [images], "int32", to=TensorProto.INT32)
    x = graph.node("Div", [graph.node("Cast", [whole], "float", to=TensorProto.FLOAT),
                           graph.constant("full_scale", np.array(255.0))], "x")  # fmt: skip

    def constant(name: str, value: Any) -> str:
        return graph.constant(name, np.array(value))

    def cut(value: str, name: str, starts: list[int], ends: list[int], axes: list[int]) -> str:
        parts = (("starts", starts), ("ends", ends), ("axes", axes))
        bounds = [graph.constant(f"{name}_{part}", np.array(v)) for part, v in parts]
        return graph.node("Slice", [value, *bounds], name)

    def mean(value: str, name: str, axes: list[int]) -> str:
        """[B, 1]: the mean over `axes`, then flattened to one column."""
        reduced = graph.node("ReduceMean", [value], f"{name}_mean", axes=axes, keepdims=0)
        shape = graph.constant(f"{name}_shape", np.array([-1, 1]))
        return graph.node("Reshape", [reduced, shape], name)

    def log(value: str, name: str) -> str:
        return graph.node("Log", [graph.node("Add", [value, constant(f"{name}_eps", EPSILON)],
                                             f"{name}_plus")], name)  # fmt: skip

    def flat(value: str, name: str) -> str:
        return graph.node("Flatten", [value], name, axis=1)

    dx = graph.node("Sub", [cut(x, "right", [1], [32], [2]), cut(x, "left", [0], [31], [2])],
                    "dx")  # fmt: skip
    dy = graph.node("Sub", [cut(x, "down", [1], [32], [1]), cut(x, "up", [0], [31], [1])],
                    "dy")  # fmt: skip
    diagonal = graph.node(
        "Sub",
        [cut(x, "lower", [1, 1], [32, 32], [1, 2]), cut(x, "upper", [0, 0], [31, 31], [1, 2])],
        "diagonal",
    )  # fmt: skip
    second = graph.node(
        "Add",
        [graph.node("Sub", [cut(x, "third", [2], [32], [2]),
                            graph.node("Mul", [cut(x, "middle", [1], [31], [2]),
                                               constant("two", 2.0)], "twice")], "part"),
         cut(x, "first", [0], [30], [2])],
        "second",
    )  # fmt: skip
    both = graph.node("Concat", [flat(dx, "dx_flat"), flat(dy, "dy_flat")], "both", axis=1)
    magnitude = graph.node("Abs", [both], "magnitude")
    both_centred = graph.node(
        "Sub", [both, graph.node("ReduceMean", [both], "both_mean", axes=[1])], "both_centred"
    )
    both_std = graph.node("Sqrt", [mean(graph.node("Mul", [both_centred, both_centred],
                                                   "both_square"), "both_var", [1])],
                          "both_std")  # fmt: skip
    grey = graph.node("ReduceMean", [x], "grey", axes=[3], keepdims=0)
    centred = graph.node(
        "Sub", [grey, graph.node("ReduceMean", [grey], "grey_mean", axes=[1, 2])], "centred"
    )
    variance = mean(graph.node("Mul", [centred, centred], "centred_square"), "variance", [1, 2])
    covariance = mean(
        graph.node("Mul", [cut(centred, "c_right", [1], [32], [2]),
                           cut(centred, "c_left", [0], [31], [2])], "neighbours"),
        "covariance", [1, 2],
    )  # fmt: skip
    floor = constant("variance_floor", 1e-12)
    correlation = graph.node(
        "Where",
        [graph.node("Greater", [variance, floor], "has_variance"),
         graph.node("Div", [covariance, graph.node("Max", [variance, floor], "variance_kept")],
                    "ratio"),
         constant("smooth", 1.0)],
        "correlation",
    )  # fmt: skip
    share = lambda op, bound, name: mean(  # noqa: E731
        graph.node("Cast", [graph.node(op, [magnitude, constant(f"{name}_bound", bound)],
                                       f"{name}_test")], f"{name}_float", to=TensorProto.FLOAT),
        name, [1],
    )  # fmt: skip
    saturation = graph.node(
        "Sub",
        [graph.node("ReduceMax", [x], "brightest", axes=[3], keepdims=0),
         graph.node("ReduceMin", [x], "darkest", axes=[3], keepdims=0)],
        "saturation",
    )  # fmt: skip
    saturation_mean = mean(saturation, "saturation_mean", [1, 2])
    saturation_off = graph.node(
        "Sub",
        [saturation, graph.node("Unsqueeze", [saturation_mean,
                                              graph.constant("two_axes", np.array([2]))],
                                "saturation_mean_3d")],
        "saturation_off",
    )  # fmt: skip
    saturation_std = graph.node(
        "Sqrt", [mean(graph.node("Mul", [saturation_off, saturation_off], "saturation_square"),
                      "saturation_var", [1, 2])], "saturation_std",
    )  # fmt: skip
    levels = graph.node(
        "Min",
        [graph.node("Floor", [graph.node("Mul", [x, constant("bins", float(BINS))], "binned")],
                    "level"),
         constant("top_bin", float(BINS - 1))],
        "levels",
    )  # fmt: skip
    in_bin = graph.node(
        "Cast",
        [graph.node("Equal", [graph.node("Unsqueeze", [levels, graph.constant(
            "last_axis", np.array([4]))], "levels_5d"),
                              graph.constant("bin_values", np.arange(BINS, dtype=np.float32))],
                    "in_bin_bool")],
        "in_bin", to=TensorProto.FLOAT,
    )  # fmt: skip
    counts = graph.node("ReduceMean", [in_bin], "counts", axes=[1, 2], keepdims=0)  # [B, 3, bins]
    plogp = graph.node(
        "Mul", [counts, graph.node("Log", [graph.node("Max", [counts, floor], "counts_kept")],
                                   "log_counts")], "plogp",
    )  # fmt: skip
    entropy = graph.node(
        "Mul",
        [graph.node("Reshape", [graph.node("ReduceSum", [plogp, graph.constant(
            "channel_bin_axes", np.array([1, 2]))], "plogp_sum", keepdims=0),
            graph.constant("entropy_shape", np.array([-1, 1]))], "plogp_column"),
         constant("minus_third", -1.0 / 3.0)],
        "entropy",
    )  # fmt: skip
    abs_mean = lambda value, name: mean(graph.node("Abs", [value], f"{name}_abs"), name,  # noqa: E731
                                        [1, 2, 3])  # fmt: skip
    columns = [
        log(abs_mean(dx, "dx_mean"), "log_dx"),
        log(abs_mean(dy, "dy_mean"), "log_dy"),
        log(both_std, "log_both_std"),
        log(abs_mean(second, "second_mean"), "log_second"),
        correlation,
        share("Less", 1.5 * one, "flat_share"),
        share("Greater", 0.25, "edge_share"),
        log(graph.node("Sqrt", [variance], "pixel_std"), "log_pixel_std"),
        saturation_mean,
        saturation_std,
        entropy,
        log(abs_mean(diagonal, "diagonal_mean"), "log_diagonal"),
    ]
    return graph.node("Concat", columns, "statistics", axis=1)


def fit(training: Training) -> Pixels:
    """The Gaussian of the training photos' statistics."""
    if training.images is None:
        raise ValueError("the pixel statistics score is fitted on the training images")
    values = statistics(training.images)
    center = values.mean(axis=0)
    covariance, shrinkage, _ = shrunk_covariance(values - center)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    return Pixels(center, eigenvectors / np.sqrt(eigenvalues), float(shrinkage))
