"""The evidence a familiarity score is chosen by: `python -m training ood`'s results
(training/ood.py measures; this module only summarises and prints, with no TensorFlow, so
the documentation's build can render the published table from its JSON)."""

import numpy as np

from training.scores import DEFAULT

NEAR = "held-out classes"
# The README's columns: the default, the score it replaced, GEN, the top probability.
HEADLINE = (DEFAULT, "mahalanobis", "gen", "msp")
FAR = "far (mean of families)"


def summarise(runs: list[dict]) -> dict:
    """{set: {score: {"auroc": mean, "auroc_min", "auroc_max", "fpr": mean}}} over the runs,
    and the same averaged over the far families under "far (mean of families)"."""
    sets = list(runs[0]["sets"])
    scores = list(runs[0]["sets"][sets[0]])
    summary = {}
    for name in sets:
        summary[name] = {}
        for score in scores:
            auroc = np.array([run["sets"][name][score]["auroc"] for run in runs])
            fpr = np.array([run["sets"][name][score]["fpr"] for run in runs])
            summary[name][score] = {
                "auroc": float(auroc.mean()),
                "auroc_min": float(auroc.min()),
                "auroc_max": float(auroc.max()),
                "fpr": float(fpr.mean()),
            }
    far = [name for name in sets if name != NEAR]
    summary[FAR] = {
        score: {
            key: float(np.mean([summary[name][score][key] for name in far]))
            for key in ("auroc", "auroc_min", "auroc_max", "fpr")
        }
        for score in scores
    }
    return summary


def table(result: dict, scores: list[str] | None = None) -> str:
    """Markdown: one row per set of images, one column per score, "AUROC / FPR@95" in
    percent (AUROC's range over the runs below it in the JSON)."""
    summary = result["summary"]
    scores = scores or list(next(iter(summary.values())))
    lines = [
        "| images | " + " | ".join(scores) + " |",
        "|---|" + "---:|" * len(scores),
    ]
    for name, row in summary.items():
        cells = [f"{100 * row[s]['auroc']:.1f} / {100 * row[s]['fpr']:.0f}" for s in scores]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
