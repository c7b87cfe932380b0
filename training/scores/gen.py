"""Generalized entropy (Liu, Lochman and Zach, 2023, "GEN: Pushing the Limits of
Softmax-Based Out-of-Distribution Detection"; OpenOOD's GEN).

strangeness(x) = sum_k p_k^g (1 - p_k)^g over the classifier's probabilities, g = 0.1 and
every class (OpenOOD's setting for CIFAR-100: M = 100, gamma = 0.1). With g < 1 it counts
the many small probabilities a confident prediction leaves almost at zero: a flat tail is
strange even when the top class wins.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.scores.base import (
    Inputs,
    Nodes,
    Training,
    log_sum_exp,
    logit_scale,
    logits,
    logits_node,
)

NAME = "gen"
GAMMA = 0.1
METHOD = (
    f"generalized entropy of the probabilities (Liu et al., 2023): sum over every class of "
    f"p^{GAMMA:g} (1 - p)^{GAMMA:g}"
)
# A probability's relative error is about twice its logit's (the logit and the log-sum-exp
# it is divided by), and so is 1 - p's: both worlds compute 1 - p without cancellation (see
# `_probabilities`), plus a few ulps for the sums and the division. Exponentials below
# TINY underflow to 0 in float32, each one taking up to TINY off a sum.
RTOL = 1e-5
EPSILON32 = float(np.finfo(np.float32).eps)
TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class Gen:
    kernel: np.ndarray
    bias: np.ndarray
    name: str = NAME

    def strangeness(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        p, q = self._probabilities(inputs.features)
        return (p**GAMMA * q**GAMMA).sum(axis=1)

    def rounding(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        """Each term between its values at the ends of p's and 1 - p's rounding ranges."""
        features = inputs.features
        p, q = self._probabilities(features)
        terms = p**GAMMA * q**GAMMA
        logit = 2 * RTOL * (logit_scale(features, self.kernel, self.bias) + 1)[:, None]
        relative, underflow = logit + 8 * EPSILON32, p.shape[1] * TINY

        def term(scale: float) -> np.ndarray:
            ends = [np.maximum(v * (1 + scale * relative) + scale * underflow, 0) for v in (p, q)]
            return ends[0] ** GAMMA * ends[1] ** GAMMA

        upper, lower = term(1), term(-1)
        return np.maximum(upper - terms, terms - lower).sum(axis=1) + RTOL * terms.sum(axis=1)

    def _probabilities(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """p and 1 - p, float64. Where p > 1/2 (the top class, if any), 1 - p is the sum of
        the other classes' probabilities: written as 1 - p it cancels to nothing when p is
        within an ulp of 1, where the term (1 - p)^0.1 can still be 0.03. Elsewhere 1 - p
        is at least 1/2 and cancels nothing. The graph does the same."""
        values = logits(features, self.kernel, self.bias)
        p = np.exp(values - log_sum_exp(values)[:, None])
        top = p > 0.5
        others = np.where(top, 0, p).sum(axis=1, keepdims=True)
        return p, np.where(top, others, 1 - p)

    def add_nodes(self, graph: Nodes, inputs: Inputs[str]) -> str:
        """e = exp(l - max l), S = sum e, p = e / S, and 1 - p = (S - e) / S, except where
        e > S / 2: there the sum of the other classes' e, over S."""
        scores = logits_node(graph, inputs.features, self.kernel, self.bias)
        axis = graph.constant("axis", np.array([1], np.int64))
        top_logit = graph.node("ReduceMax", [scores], "top_logit", axes=[1])
        e = graph.node("Exp", [graph.node("Sub", [scores, top_logit], "shifted")], "e")
        total = graph.node("ReduceSum", [e, axis], "total")
        half = graph.node("Mul", [total, graph.constant("half", np.array(0.5))], "half_total")
        top = graph.node("Greater", [e, half], "top")
        zero = graph.constant("zero", np.array(0.0))
        others = graph.node(
            "ReduceSum", [graph.node("Where", [top, zero, e], "others_e"), axis], "others"
        )
        rest = graph.node("Where", [top, others, graph.node("Sub", [total, e], "rest_all")],
                          "rest")  # fmt: skip
        p = graph.node("Div", [e, total], "p")
        q = graph.node("Div", [rest, total], "q")
        gamma = graph.constant("gamma", np.array(GAMMA))
        terms = graph.node(
            "Mul",
            [graph.node("Pow", [p, gamma], "p_gamma"), graph.node("Pow", [q, gamma], "q_gamma")],
            "terms",
        )
        return graph.node("ReduceSum", [terms, axis], "generalized_entropy")

    def card(self) -> dict[str, Any]:
        return {"method": METHOD, "gamma": GAMMA, "classes": int(self.kernel.shape[1])}


def fit(training: Training) -> Gen:
    return Gen(np.asarray(training.kernel, np.float64), np.asarray(training.bias, np.float64))
