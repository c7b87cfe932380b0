"""What every strangeness score is: fitted on the training images, computed by a NumPy
reference in float64 and by ONNX nodes in float32, described on the model card.

A score maps an image to one number, larger = stranger. It reads what it needs of the
image's `Inputs`: the uint8 pixels (the graph's input) and the penultimate features (the
graph's `features` output); a score on one ignores the other. Whatever
the score, `training.familiarity` turns it into the same calibrated answer (the share of
validation images at least as strange), so a client reads every score the same way and a
new score is one module: a `fit` function returning an object with the four methods of
`Fitted` below, and its entry in `training.scores.SCORES`.

Scores that need the logits compute them from the features with the classifier layer's own
kernel and bias (`logits`, `logits_node`): features -> logits is one dense layer, so every
score is a function of the images and the `features` output, and is checked against its
reference on the graph's own features, whatever came before.
"""

from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from onnx import helper, numpy_helper

T = TypeVar("T")


@dataclass(frozen=True)
class Inputs(Generic[T]):
    """What a score reads of a batch of images: arrays for the reference (uint8
    [N, 32, 32, 3] images, [N, d] features), tensor names for `add_nodes`. One type for
    both worlds, so a score's reference and its nodes name the same two things."""

    images: T
    features: T

    def __len__(self) -> int:
        return len(self.features)

    def take(self, index: Any) -> "Inputs[T]":
        """The same images, indexed (arrays only)."""
        return Inputs(self.images[index], self.features[index])


@dataclass(frozen=True)
class Training:
    """What a score may be fitted on: the training images (None where only feature scores
    are fitted), their features and labels, and the classifier layer (features @ kernel +
    bias = logits)."""

    features: np.ndarray  # [N, d]
    labels: np.ndarray  # [N]
    kernel: np.ndarray  # [d, C]
    bias: np.ndarray  # [C]
    images: np.ndarray | None = None  # [N, 32, 32, 3] uint8

    @property
    def inputs(self) -> Inputs[np.ndarray]:
        return Inputs(self.images, self.features)


class Fitted(Protocol):
    """A fitted score."""

    name: str

    def strangeness(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        """[N] float64, larger = stranger: the reference the graph is checked against."""
        ...

    def rounding(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        """[N] how far float32 rounding in the graph can move each strangeness (a bound,
        from the magnitudes the graph's sums add up)."""
        ...

    def add_nodes(self, graph: "Nodes", inputs: Inputs[str]) -> str:
        """Append the nodes computing [batch, 1] strangeness from the tensors `inputs`
        names; its name."""
        ...

    def card(self) -> dict[str, Any]:
        """How it was fitted: `method` (one sentence) and whatever a reader needs."""
        ...


@dataclass
class Nodes:
    """Nodes and float32 constants appended to a graph, every name under one prefix."""

    prefix: str
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)

    def within(self, prefix: str) -> "Nodes":
        """Nodes appended to the same graph, their names under prefix as well."""
        return Nodes(self.prefix + prefix, self.nodes, self.initializers)

    def constant(self, name: str, value: np.ndarray) -> str:
        """float32, or int64 for integers (axes)."""
        full, value = self.prefix + name, np.asarray(value)
        value = value.astype(np.int64 if value.dtype.kind in "iu" else np.float32)
        self.initializers.append(numpy_helper.from_array(value, full))
        return full

    def node(self, op: str, inputs: list[str], output: str, **attributes: Any) -> str:
        full = self.prefix + output
        self.nodes.append(helper.make_node(op, inputs, [full], **attributes))
        return full


# The logits, in both worlds. Float32 rounds each logit by at most a few ulps of the sum
# of |f_j W_jk| it adds up (plus |b_k|); `logit_scale` is that sum, per image, its largest.


def logits(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return np.asarray(features, np.float64) @ kernel + bias


def logit_scale(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (np.abs(np.asarray(features, np.float64)) @ np.abs(kernel) + np.abs(bias)).max(axis=1)


def logits_node(graph: Nodes, features: str, kernel: np.ndarray, bias: np.ndarray) -> str:
    return graph.node(
        "Gemm", [features, graph.constant("kernel", kernel), graph.constant("bias", bias)],
        "logits",
    )  # fmt: skip


def log_sum_exp(values: np.ndarray) -> np.ndarray:
    """[N] log sum_k exp(values[:, k]), in float64 without overflow."""
    top = values.max(axis=1)
    return top + np.log(np.exp(values - top[:, None]).sum(axis=1))


def log_sum_exp_node(graph: Nodes, values: str, name: str) -> str:
    """[B, 1]: the same, subtracting the maximum first as the reference does (opset 17's
    ReduceLogSumExp makes no promise about overflow)."""
    top = graph.node("ReduceMax", [values], f"{name}_max", axes=[1])
    shifted = graph.node("Sub", [values, top], f"{name}_shifted")
    total = graph.node("ReduceSum", [graph.node("Exp", [shifted], f"{name}_exp"),
                                     graph.constant(f"{name}_axis", np.array([1], np.int64))],
                       f"{name}_sum")  # fmt: skip
    return graph.node("Add", [top, graph.node("Log", [total], f"{name}_log")], name)
