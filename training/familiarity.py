"""Familiarity: how like the training data an image is, calibrated, as a graph output.

A strangeness score (one of `training.scores`, chosen at export; the default chosen by
`python -m training ood`) maps an image (its uint8 pixels, its penultimate features, or
both: `Inputs`) to a number, larger = stranger. A raw score means nothing to a client (its
scale depends on the score, the model and the feature width), so it is calibrated on the
validation images:

    familiarity(x) = share of validation images whose strangeness is larger than x's

0.01 means stranger than 99 % of the validation set; on validation data it is uniform on
{0, 1/V, ..., (V-1)/V}, whatever the score. Everything the formula needs (the score's
constants, the sorted validation strangeness) is a constant, so the export builds it into
the ONNX graph as a third output computed from the graph's `images` input and `features`
output: the service, Triton and any other onnxruntime get it with no code of their own.

This module has three parts, top-down: `fit` (NumPy, float64), the NumPy reference
(`familiarity_of`, `rank_bounds` and `parity_failure`, which the export's gate runs) and
`add_to_graph` (the ONNX nodes, float32, opset 17).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from contract.modelcard import FAMILIARITY_NAME, FEATURES_NAME, INPUT_NAME, NUM_CLASSES
from training.scores import DEFAULT, SCORES
from training.scores.base import Fitted, Inputs, Nodes, Training

CALIBRATION = "familiarity = share of validation images whose strangeness is larger"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# ReduceMean divides a float32 count by V: one rounding, far below 1/V.
MEAN_ATOL = 1e-6
PREFIX = "familiarity/"  # every name this module adds to a graph, apart from the output


@dataclass(frozen=True)
class Familiarity:
    """A fitted score and its calibration: the validation images' strangeness, sorted, in
    float32 as the graph stores it."""

    score: Fitted
    validation: np.ndarray  # [V] ascending, float32
    card: dict[str, Any]  # ModelCard.familiarity: which score, how fitted and calibrated


def fit(training: Training, validation: Inputs[np.ndarray], score: str = DEFAULT) -> Familiarity:
    """Fit `score` on the training images, calibrate it on the validation images."""
    if len(training.features) == 0 or len(validation) == 0:
        raise ValueError("familiarity needs training and validation images")
    if score not in SCORES:
        raise ValueError(f"unknown familiarity score {score!r}; known: {', '.join(SCORES)}")
    fitted = SCORES[score](training)
    # Stored as the graph stores them: float32, sorted (the graph needs no sorting, but a
    # reader of the file, and the reference's searchsorted, do).
    calibration = np.sort(fitted.strangeness(validation)).astype(np.float32)
    trained = set(np.unique(np.asarray(training.labels)).tolist())
    card = {
        "score": fitted.name,
        **fitted.card(),
        "calibration": CALIBRATION,
        "training_images": len(training.features),
        "classes_without_training_images": sorted(set(range(NUM_CLASSES)) - trained),
        "validation_images": len(calibration),
        "validation_strangeness_quantiles": {
            f"{q:g}": float(np.quantile(calibration.astype(np.float64), q)) for q in QUANTILES
        },
    }
    return Familiarity(fitted, calibration, card)


# The NumPy reference. Independent of the graph in how it computes: float64 (each score's
# own reference), ranks by binary search (the graph compares against every validation
# image).


def familiarity_of(familiarity: Familiarity, inputs: Inputs[np.ndarray]) -> np.ndarray:
    """[N, 1] float32: the share of validation strangeness strictly larger than each image's."""
    return ranks_above(familiarity.validation, familiarity.score.strangeness(inputs))


def ranks_above(validation: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[N, 1] float32: for each score, the share of the sorted `validation` above it.

    Scores are rounded to float32 first, as the graph's are: a validation image's own
    score then ties with its stored float32 copy instead of landing on either side of it,
    and the reference gives the validation set exactly the ranks 0, 1/V, ..., (V-1)/V.
    """
    scores = np.asarray(scores).astype(np.float32)
    above = len(validation) - np.searchsorted(validation, scores, side="right")
    return (above / len(validation)).astype(np.float32)[:, None]


def rank_bounds(
    familiarity: Familiarity, inputs: Inputs[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """[N] lowest and highest familiarity that float32 rounding of these images' scores
    can give (see `parity_failure`): equal where no validation score lies within the
    rounding band, so any correct float32 computation gives that exact value."""
    score = familiarity.score.strangeness(inputs)
    band = familiarity.score.rounding(inputs)
    validation = familiarity.validation
    return ranks_above(validation, score + band)[:, 0], ranks_above(validation, score - band)[:, 0]


def parity_failure(
    familiarity: Familiarity, inputs: Inputs[np.ndarray], onnx_familiarity: np.ndarray
) -> str | None:
    """What is wrong with the graph's familiarity for these images (their pixels, and the
    graph's own `features` output for them, checked against Keras separately), or None.

    Familiarity is a rank: a score that float32 rounding moves past one validation score
    moves the answer by a whole 1/V, so a plain absolute tolerance is either too tight
    (fails on a correct graph where validation scores are dense) or too loose (lets a wrong
    one through where they are sparse). Instead the reference score gets a rounding band
    (the score's own `rounding`) either way, and the graph's answer must be a rank that
    some score in that band has: between the share of validation scores above the band's
    top and the share above its bottom (plus MEAN_ATOL for the division). Outside it, the
    graph does not compute this score.
    """
    onnx_familiarity = np.asarray(onnx_familiarity)
    if onnx_familiarity.shape != (len(inputs), 1):
        return f"familiarity has shape {onnx_familiarity.shape}, expected ({len(inputs)}, 1)"
    lowest, highest = rank_bounds(familiarity, inputs)
    lowest, highest = lowest - MEAN_ATOL, highest + MEAN_ATOL
    got = onnx_familiarity[:, 0]
    outside = ~((lowest <= got) & (got <= highest))  # a NaN is outside too
    exact = familiarity_of(familiarity, inputs)[:, 0]
    print(
        f"Familiarity ({familiarity.score.name}) parity on {len(got)} images: max |onnx - "
        f"reference| = {float(np.abs(got - exact).max()):.2e} ({len(familiarity.validation)} "
        f"validation images), {int(outside.sum())} outside the rounding band",
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


# The graph.


def add_to_graph(proto: onnx.ModelProto, familiarity: Familiarity) -> None:
    """Append the familiarity head to `proto` (in place): FAMILIARITY_NAME, float32
    [batch, 1], computed from the INPUT_NAME input and the FEATURES_NAME output (each
    score reads what it needs of them). The score's own nodes give its strangeness
    s [B, 1]; then

        answer = ReduceMean(Cast(Less(s, validation)))        [B, 1]

    The comparison is [B, V]: a few hundred thousand compares for a batch, cheaper than
    anything a sort-free binary search would save in ONNX.
    """
    graph = proto.graph
    taken = {name for node in graph.node for name in node.output}
    taken |= {i.name for i in graph.initializer} | {o.name for o in graph.output}
    if any(name.startswith(PREFIX) for name in taken) or FAMILIARITY_NAME in taken:
        raise ValueError(f"the graph already has {FAMILIARITY_NAME} nodes")
    if FEATURES_NAME not in {o.name for o in graph.output}:
        raise ValueError(f"the graph has no {FEATURES_NAME!r} output to compute it from")
    if INPUT_NAME not in {i.name for i in graph.input}:
        raise ValueError(f"the graph has no {INPUT_NAME!r} input to compute it from")

    nodes = Nodes(PREFIX)
    strangeness = familiarity.score.add_nodes(nodes, Inputs(INPUT_NAME, FEATURES_NAME))
    # Less(s, v): validation image v is stranger than this one.
    stranger = nodes.node(
        "Less", [strangeness, nodes.constant("validation", familiarity.validation)], "stranger"
    )
    as_float = nodes.node("Cast", [stranger], "stranger_float", to=TensorProto.FLOAT)
    nodes.nodes.append(helper.make_node("ReduceMean", [as_float], [FAMILIARITY_NAME], axes=[1]))
    graph.initializer.extend(nodes.initializers)
    graph.node.extend(nodes.nodes)
    graph.output.append(
        helper.make_tensor_value_info(FAMILIARITY_NAME, TensorProto.FLOAT, ["batch", 1])
    )
