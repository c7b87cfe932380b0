"""The evidence a familiarity score is chosen by: `python -m training ood`'s results
(training/ood.py measures; this module only summarises and prints, with no TensorFlow, so
the documentation's build can render the published table from its JSON)."""

import numpy as np

from training.scores import DEFAULT

NEAR = "held-out classes"
# The README's columns: the default (the combination the split chose among all), the
# default before it, the feature score the split chose, GEN, the pixel score alone, the
# top probability.
HEADLINE = (DEFAULT, "mean:mahalanobis,gen", "either:mahalanobis,gen", "gen", "pixels", "msp")
FAR = "far (mean of families)"


def summarise(runs: list[dict]) -> dict:
    """{set: {score: {"auroc": mean, "auroc_min", "auroc_max", "fpr": mean, "refused": mean}}}
    over the runs, and the same averaged over the far families under FAR."""
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
            if all("refused" in run["sets"][name][score] for run in runs):
                refused = [run["sets"][name][score]["refused"] for run in runs]
                summary[name][score]["refused"] = float(np.mean(refused))
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


def judged_table(result: dict) -> str:
    """Markdown: the choice on the choosing families, judged on the others. One row per
    family, one column per split (seed, and "r" for its reverse): the AUROC in % of the
    score chosen among the exportable ones, then MSP's; a family chosen on in a split
    has no number there."""
    splits = result["choice"]["splits"]
    heads = [f"{s['seed']}{'r' if s['reversed'] else ''}" for s in splits]
    lines = [
        "| images | " + " | ".join(f"split {h}" for h in heads) + " |",
        "|---|" + "---:|" * len(splits),
        "| chosen | " + " | ".join(f"`{s['exportable']}`" for s in splits) + " |",
    ]
    names = [NEAR, *result["families"]]
    for name in names:
        cells = []
        for split in splits:
            judged = split["judged"].get(name)
            cells.append(
                "" if judged is None
                else f"{100 * judged[split['exportable']]:.1f} ({100 * judged['msp']:.1f})"
            )  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
