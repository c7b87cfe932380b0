"""Two scores as one: each first made a percentile of the training images' own scores (so
that a Mahalanobis distance and an entropy are on one scale), then

    either: the larger percentile: strange if either score finds it strange;
    mean:   the mean of the two (a rank average).

Why combine: a score on the penultimate features (Mahalanobis) and one on the classifier's
outputs (energy, GEN) fail on different images. Features far from every training image
(noise, text, flat colour) can still excite one class strongly; a photo of an unseen class
has features like the training photos' but an unsure classifier. The pixels' score
(`pixels`) sees what no network output does, an image unlike any photo, and nothing of
its content: a photo of an unseen class has a photo's pixels.

The percentile is the training scores' distribution function, interpolated linearly
between QUANTILES order statistics (not all the scores: the file would carry 45,000
numbers per score for CIFAR-100), and beyond the largest it keeps rising, by its distance
past it over the quantiles' range. So it is continuous and increasing: two images tie only
when their scores do, and the familiarity calibrated on it stays uniform on the validation
images, as with a single score.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto

from training.scores.base import Fitted, Inputs, Nodes

QUANTILES = 1024
HOW = {
    "either": "the larger of the two percentiles (strange if either score finds it strange)",
    "mean": "the mean of the two percentiles (a rank average)",
}
# The graph's percentile is a count (exact), a gathered pair of quantiles and one
# interpolation: a few float32 roundings of numbers at most ~1 (beyond the tail, of the
# tail's size).
PERCENTILE_RTOL = 1e-6


@dataclass(frozen=True)
class Combined:
    first: Fitted
    second: Fitted
    how: str  # a key of HOW
    quantiles: tuple[np.ndarray, np.ndarray]  # each score's, float32, strictly increasing
    name: str

    def strangeness(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        return self._combine(*self._percentiles(inputs, 0))

    def rounding(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        """Each percentile can be any that a score within its own rounding band gets (it
        increases with the score, so the ends bound it), then rounds a little itself; the
        combination increases with both."""
        center = self.strangeness(inputs)
        low = self._combine(*self._percentiles(inputs, -1))
        high = self._combine(*self._percentiles(inputs, 1))
        return np.maximum(high - center, center - low) + PERCENTILE_RTOL * (1 + np.abs(high))

    def _percentiles(self, inputs: Inputs[np.ndarray], side: int) -> list[np.ndarray]:
        """Each score's percentile, its score moved by `side` times its rounding band."""
        return [
            percentile(quantiles, score.strangeness(inputs) + side * score.rounding(inputs))
            for score, quantiles in zip((self.first, self.second), self.quantiles, strict=True)
        ]

    def _combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.maximum(a, b) if self.how == "either" else (a + b) / 2

    def add_nodes(self, graph: Nodes, inputs: Inputs[str]) -> str:
        shares = []
        for score, quantiles, part in zip((self.first, self.second), self.quantiles, "ab",
                                          strict=True):  # fmt: skip
            own = graph.within(f"{part}/")
            value = score.add_nodes(own, inputs)
            shares.append(percentile_nodes(own.within("percentile/"), value, quantiles))
        if self.how == "either":
            return graph.node("Max", shares, "either")
        total = graph.node("Add", shares, "sum")
        return graph.node("Mul", [total, graph.constant("half", np.array(0.5))], "mean")

    def card(self) -> dict[str, Any]:
        return {
            "method": f"{self.first.card()['method']}; and {self.second.card()['method']}; "
            f"each as a percentile of the training images' scores, combined as {HOW[self.how]}",
            "combined": {"how": self.how, "training_quantiles": [len(q) for q in self.quantiles]},
            "first": self.first.card(),
            "second": self.second.card(),
        }


def combine(first: Fitted, second: Fitted, how: str, training: Inputs[np.ndarray]) -> Combined:
    """The two fitted scores, with QUANTILES order statistics of their training scores."""
    return Combined(first, second, how,
                    tuple(quantiles_of(s.strangeness(training)) for s in (first, second)),
                    f"{how}:{first.name},{second.name}")  # fmt: skip


def quantiles_of(scores: np.ndarray) -> np.ndarray:
    """Up to QUANTILES order statistics, float32 as the graph stores them, strictly
    increasing (duplicates dropped: the interpolation divides by each gap), at least two."""
    positions = (np.arange(QUANTILES) + 0.5) / QUANTILES
    quantiles = np.unique(np.quantile(scores, positions).astype(np.float32))
    if len(quantiles) < 2:  # every training image scored the same
        quantiles = np.array([quantiles[0], np.nextafter(quantiles[0], np.float32(np.inf))])
    return quantiles


def percentile(quantiles: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[N] float64: with k the number of quantiles below the (float32-rounded) score and
    q_lo, q_hi the two around it, (k - 1 + (s - q_lo) / (q_hi - q_lo)) / (Q - 1), clipped
    to [0, 1], plus (s - q_max) / (q_max - q_min) beyond the largest quantile."""
    q = quantiles.astype(np.float64)
    s = np.asarray(scores).astype(np.float32).astype(np.float64)
    count = len(q)
    above = np.clip(np.searchsorted(quantiles, s.astype(np.float32), side="left"), 1, count - 1)
    low, high = q[above - 1], q[above]
    inside = (above - 1 + np.clip((s - low) / (high - low), 0, 1)) / (count - 1)
    return inside + np.maximum(s - q[-1], 0) / (q[-1] - q[0])


def percentile_nodes(graph: Nodes, scores: str, quantiles: np.ndarray) -> str:
    """The same, [B, 1]: Less against every quantile counts k exactly; Gather fetches the
    two quantiles around the score; the rest is arithmetic on [B, 1]."""
    count = len(quantiles)
    table = graph.constant("quantiles", quantiles)
    below = graph.node("Cast", [graph.node("Less", [table, scores], "below")], "below_float",
                       to=TensorProto.FLOAT)  # fmt: skip
    k = graph.node("ReduceSum", [below, graph.constant("axis", np.array([1], np.int64))], "count")
    high_index = graph.node(
        "Cast",
        [graph.node("Clip", [k, graph.constant("one", np.array(1.0)),
                             graph.constant("last", np.array(count - 1.0))], "high_float")],
        "high_index", to=TensorProto.INT64,
    )  # fmt: skip
    low_index = graph.node("Sub", [high_index, graph.constant("step", np.array(1, np.int64))],
                           "low_index")  # fmt: skip
    low = graph.node("Gather", [table, low_index], "low", axis=0)
    high = graph.node("Gather", [table, high_index], "high", axis=0)
    fraction = graph.node(
        "Clip",
        [graph.node("Div", [graph.node("Sub", [scores, low], "past_low"),
                            graph.node("Sub", [high, low], "gap")], "fraction_raw"),
         graph.constant("zero", np.array(0.0)), graph.constant("one_again", np.array(1.0))],
        "fraction",
    )  # fmt: skip
    inside = graph.node(
        "Div",
        [graph.node("Add", [graph.node("Cast", [low_index], "low_float", to=TensorProto.FLOAT),
                            fraction], "position"),
         graph.constant("intervals", np.array(count - 1.0))],
        "inside",
    )  # fmt: skip
    # The tail's start and scale from the table itself: the table is the one constant.
    first = graph.node("Gather", [table, graph.constant("first_index", np.array([0]))],
                       "smallest", axis=0)  # fmt: skip
    last = graph.node("Gather", [table, graph.constant("last_index", np.array([count - 1]))],
                      "largest", axis=0)  # fmt: skip
    beyond = graph.node("Relu", [graph.node("Sub", [scores, last], "past_largest")], "beyond")
    tail = graph.node("Div", [beyond, graph.node("Sub", [last, first], "range")], "tail")
    return graph.node("Add", [inside, tail], "percentile")
