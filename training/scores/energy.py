"""Energy (Liu et al., 2020, "Energy-based Out-of-distribution Detection"; OpenOOD's EBO).

strangeness(x) = -log sum_k exp(logit_k(x)): the negative free energy of the classifier's
logits. Unlike the top probability it keeps the logits' scale, which softmax throws away:
an image that excites no class strongly has low logits everywhere, and high energy, even
when one class wins the softmax by a wide margin. Nothing is fitted beyond the classifier.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.scores.base import (
    Inputs,
    Nodes,
    Training,
    log_sum_exp,
    log_sum_exp_node,
    logit_scale,
    logits,
    logits_node,
)

NAME = "energy"
METHOD = (
    "energy of the logits (Liu et al., 2020): minus the log of the sum of the exponentials "
    "of the classifier's logits, temperature 1"
)
# Each float32 logit is off by a few ulps of the sum of |f_j W_jk| it adds up; the
# log-sum-exp adds a few ulps of its own largest term. 1e-5 is ~80 ulps of that scale.
RTOL = 1e-5


@dataclass(frozen=True)
class Energy:
    kernel: np.ndarray
    bias: np.ndarray
    name: str = NAME

    def strangeness(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        return -log_sum_exp(logits(inputs.features, self.kernel, self.bias))

    def rounding(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        return RTOL * (logit_scale(inputs.features, self.kernel, self.bias) + 1)

    def add_nodes(self, graph: Nodes, inputs: Inputs[str]) -> str:
        lse = log_sum_exp_node(graph, logits_node(graph, inputs.features, self.kernel, self.bias),
                               "log_sum_exp")  # fmt: skip
        return graph.node("Neg", [lse], "energy")

    def card(self) -> dict[str, Any]:
        return {"method": METHOD, "temperature": 1.0, "classes": int(self.kernel.shape[1])}


def fit(training: Training) -> Energy:
    return Energy(np.asarray(training.kernel, np.float64), np.asarray(training.bias, np.float64))
