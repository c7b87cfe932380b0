"""Relative Mahalanobis distance (Ren et al., 2021, "A Simple Fix to Mahalanobis Distance for
Improving Near-OOD Detection"; OpenOOD's RMDS).

The plain class-conditional distance (`mahalanobis`) is large for any image whose features
are far out along directions where *all* training images vary a lot, familiar or not: it
measures how unusual the features are, not how unlike each class. Ren et al. subtract the
distance under one background Gaussian fitted to all training features together:

    strangeness(x) = min_k [ MD_k(x) - MD_0(x) ] = min_k MD_k(x) - MD_0(x)

so what counts is how much nearer the class means are than the training set as a whole.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.scores.base import Inputs, Nodes, Training
from training.scores.mahalanobis import Gaussians, gaussians

NAME = "relative_mahalanobis"
METHOD = (
    "relative Mahalanobis distance (Ren et al., 2021): squared Mahalanobis distance of the "
    "penultimate features to the nearest class mean (one mean per class, one shared "
    "covariance) minus their squared distance under one Gaussian fitted to all training "
    "features"
)


@dataclass(frozen=True)
class RelativeMahalanobis:
    classes: Gaussians
    background: Gaussians
    name: str = NAME

    def strangeness(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        return self.classes.nearest(inputs.features) - self.background.nearest(inputs.features)

    def rounding(self, inputs: Inputs[np.ndarray]) -> np.ndarray:
        return self.classes.rounding(inputs.features) + self.background.rounding(inputs.features)

    def add_nodes(self, graph: Nodes, inputs: Inputs[str]) -> str:
        near = self.classes.add_nodes(graph, inputs.features, "class")
        far = self.background.add_nodes(graph, inputs.features, "background")
        return graph.node("Sub", [near, far], "relative_distance")

    def card(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "classes": len(self.classes.classes),
            "feature_width": len(self.classes.center),
            "regularisation": self.classes.regularisation,
            "background_regularisation": self.background.regularisation,
        }


def fit(training: Training) -> RelativeMahalanobis:
    return RelativeMahalanobis(
        classes=gaussians(training.features, training.labels),
        background=gaussians(training.features, training.labels, per_class=False),
    )
