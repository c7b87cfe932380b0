"""Strangeness scores, one module each (see `base` for what a score is), and combinations
of two (`combined`). `SCORES` names them for the export's --familiarity-score and for the
measurement that chose DEFAULT (`python -m training ood`). Each reads what it needs of an
image's `Inputs` (pixels, features), so each is built into the graph the same way."""

import functools
from collections.abc import Callable

from training.scores import combined, energy, gen, mahalanobis, pixels, relative_mahalanobis
from training.scores.base import Fitted, Training

SINGLE: dict[str, Callable[[Training], Fitted]] = {
    module.NAME: module.fit for module in (mahalanobis, relative_mahalanobis, energy, gen, pixels)
}
# A score on the features with one on the classifier's outputs; the pixels' score with one
# on the features or the outputs (alone it knows nothing of the classes).
PAIRS = (
    ("mahalanobis", "gen"),
    ("mahalanobis", "energy"),
    ("relative_mahalanobis", "gen"),
    *((pixels.NAME, partner) for partner in ("mahalanobis", "relative_mahalanobis", "gen",
                                             "energy")),
)  # fmt: skip


def _combination(first: str, second: str, how: str, training: Training) -> Fitted:
    return combined.combine(SINGLE[first](training), SINGLE[second](training), how,
                            training.inputs)  # fmt: skip


SCORES: dict[str, Callable[[Training], Fitted]] = {
    **SINGLE,
    **{
        f"{how}:{first},{second}": functools.partial(_combination, first, second, how)
        for first, second in PAIRS
        for how in combined.HOW
    },
}
DEFAULT = "mean:pixels,gen"  # chosen by `python -m training ood`: docs/exported-files.md
