"""The rollout page: a candidate version against the serving one, from the payload log.

`python -m training report --compare DIR` reads the rows of the service's payload log that
a shadow candidate also answered (service/shadow.py writes both answers on one row) and
writes, for each model id among them, beside that model's report:

    reports/<id>/rollout-<id>.html, rollout-<id>.json (every number on the page),
    rollout-<id>-*.png

For each (serving version, candidate) pair logged: how often the two give the same top
class, overall and per class and superclass of the serving version's answer, each with a
Wilson 95 % interval (an interval that stays inside [0, 1] and is honest at small counts,
where a normal approximation is not); the classes they trade (serving answer -> candidate
answer, among the images they disagree on); the familiarity shift; each version's time
per request; and the images they disagree on most (both confident, different answers).
Agreement is not accuracy: traffic has no true labels. It says where to look before
promoting.
"""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats

from training.atomic import write_text
from training.errors import ReportError
from training.report import figures, montages
from training.report.figures import plt
from training.report.pages import environment
from training.report.sentences import pct
from training.report.traffic import Classes

CONFIDENCE = 0.95  # of every interval on the page
SHOWN = 10  # rows in each table
MONTAGE = 20  # disagreements shown


def wilson(successes: int, trials: int) -> tuple[float, float]:
    """The Wilson score interval of a share, at CONFIDENCE."""
    interval = stats.binomtest(successes, trials).proportion_ci(CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def share(successes: int, trials: int) -> dict:
    low, high = wilson(successes, trials)
    return {"agree": successes, "images": trials, "share": successes / trials,
            "low": low, "high": high}  # fmt: skip


def compare(rows: dict[str, np.ndarray], classes: Classes, model_id: str) -> dict:
    """Every number of one model's rollout page: a comparison per (serving, candidate)."""
    shadowed = rows["candidate_version"] != ""
    pairs = sorted({(str(s), str(c)) for s, c in zip(rows["model_version"][shadowed],
                                                      rows["candidate_version"][shadowed],
                                                      strict=True)})  # fmt: skip
    comparisons = []
    for serving, candidate in pairs:
        chosen = shadowed & (rows["model_version"] == serving)
        chosen &= rows["candidate_version"] == candidate
        comparisons.append(
            pair({k: v[chosen] for k, v in rows.items()}, classes, serving, candidate)
        )
    return {"model_id": model_id, "comparisons": comparisons}


def pair(rows: dict[str, np.ndarray], classes: Classes, serving: str, candidate: str) -> dict:
    ours, theirs = rows["top_classes"][:, 0], rows["candidate_top1"]
    agreed = ours == theirs
    n = len(ours)
    to_coarse = np.asarray(classes.fine_to_coarse)
    same_superclass = to_coarse[ours] == to_coarse[theirs]
    report = {
        "serving": serving,
        "candidate": candidate,
        "images": n,
        "first": str(rows["time"].min()) + "Z",
        "last": str(rows["time"].max()) + "Z",
        "overall": share(int(agreed.sum()), n),
        "same_superclass": share(int(same_superclass.sum()), n),
        "by_class": grouped(ours, agreed, classes.names),
        "by_superclass": grouped(to_coarse[ours], agreed, classes.superclass_names),
        "traded": traded(ours[~agreed], theirs[~agreed], classes.names),
        "familiarity": shift(rows["familiarity"], rows["candidate_familiarity"]),
        "latency_ms": {
            "serving": spread(rows["latency_ms"]),
            "candidate": spread(rows["candidate_latency_ms"]),
        },
        "disagreements": most_disagreed(rows, agreed, classes.names),
    }
    report["findings"] = findings(report)
    return report


def grouped(groups: np.ndarray, agreed: np.ndarray, names: list[str]) -> list[dict]:
    """Agreement per class (or superclass) of the serving answer, least agreed first."""
    found = [{"name": names[g], **share(int(agreed[groups == g].sum()), int((groups == g).sum()))}
             for g in np.unique(groups)]  # fmt: skip
    return sorted(found, key=lambda r: (r["share"], -r["images"], r["name"]))


def traded(ours: np.ndarray, theirs: np.ndarray, names: list[str]) -> list[dict]:
    """The (serving answer -> candidate answer) pairs among the disagreements, commonest
    first."""
    if not len(ours):
        return []
    found, counts = np.unique(np.stack([ours, theirs], axis=1), axis=0, return_counts=True)
    order = np.lexsort((found[:, 1], found[:, 0], -counts))[:SHOWN]
    return [{"serving": names[found[i, 0]], "candidate": names[found[i, 1]],
             "images": int(counts[i]), "share": float(counts[i] / len(ours))}
            for i in order]  # fmt: skip


def shift(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """The candidate's familiarity minus the serving version's, where both have one."""
    both = ~np.isnan(ours) & ~np.isnan(theirs)
    if not both.any():
        return {"available": False}
    difference = (theirs - ours)[both].astype(np.float64)
    return {"available": True, "images": int(both.sum()), "mean": float(difference.mean()),
            "median": float(np.median(difference)),
            "serving_median": float(np.median(ours[both])),
            "candidate_median": float(np.median(theirs[both]))}  # fmt: skip


def spread(values: np.ndarray) -> dict:
    known = values[~np.isnan(values)].astype(np.float64)
    if not len(known):
        return {"images": 0}
    return {"images": len(known), "median": float(np.median(known)),
            "p95": float(np.percentile(known, 95))}  # fmt: skip


def most_disagreed(rows: dict[str, np.ndarray], agreed: np.ndarray, names: list[str]) -> list:
    """The disagreements where both versions were surest of their different answers (the
    smaller of the two top probabilities, highest first): rows of this comparison."""
    surest = np.minimum(rows["top_probabilities"][:, 0], rows["candidate_probability"])
    found = np.flatnonzero(~agreed)
    order = found[np.lexsort((found, -surest[found]))][:MONTAGE]
    return [{"row": int(i), "serving": names[rows["top_classes"][i, 0]],
             "serving_probability": float(rows["top_probabilities"][i, 0]),
             "candidate": names[rows["candidate_top1"][i]],
             "candidate_probability": float(rows["candidate_probability"][i])}
            for i in order]  # fmt: skip


def findings(report: dict) -> dict:
    """The page's sentences, every number from the report."""
    o, s = report["overall"], report["same_superclass"]
    said = {
        "overall": (
            f"The candidate {report['candidate']} gave the serving version "
            f"{report['serving']}'s top class on {o['agree']} of {o['images']} images "
            f"({pct(o['share'])}; {CONFIDENCE:.0%} Wilson interval {pct(o['low'])} to "
            f"{pct(o['high'])}), and an answer in the same superclass on {pct(s['share'])}."
        ),
    }
    if report["traded"]:
        t = report["traded"][0]
        said["traded"] = (f"The commonest change: {t['serving']} answered {t['candidate']} "
                          f"instead, {t['images']} times.")  # fmt: skip
    else:
        said["traded"] = "The two versions never disagreed on a logged image."
    f = report["familiarity"]
    said["familiarity"] = (
        f"Over {f['images']} images, the candidate's familiarity minus the serving version's "
        f"is {f['mean']:+.3f} on average (median {f['median']:+.3f})."
        if f["available"] else
        "At least one of the two files has no familiarity output: no shift to measure."
    )  # fmt: skip
    return said


def draw(report: dict, pixels: np.ndarray, model_id: str, number: int, out: Path) -> list[str]:
    """Agreement per superclass, and the images they disagree on most; the files' names."""
    names = []
    rows = sorted(report["by_superclass"], key=lambda r: r["name"])
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(rows))
    values = np.array([r["share"] for r in rows])
    errors = np.array(
        [[r["share"] - r["low"] for r in rows], [r["high"] - r["share"] for r in rows]]
    )
    ax.bar(x, values, yerr=errors, capsize=2, color="tab:blue")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=90, fontsize=7)
    title = f"agreement by superclass of the serving answer ({CONFIDENCE:.0%} Wilson)"
    ax.set(ylabel="agreement", ylim=(0, 1), title=title)
    names.append(f"rollout-{model_id}-{number}-superclasses.png")
    figures.save(fig, out / names[-1])
    shown = [(pixels[d["row"]], f"{d['serving']} {d['serving_probability']:.2f}\n"
              f"-> {d['candidate']} {d['candidate_probability']:.2f}")
             for d in report["disagreements"]]  # fmt: skip
    if shown:
        names.append(f"rollout-{model_id}-{number}-disagreements.png")
        montages.save_image(montages.tiles(shown), out / names[-1])
    return names


def write_rollout(
    logged: dict[str, dict[str, np.ndarray]],
    classes: Callable[[str], Classes],
    reports_dir: Path,
    folder: Path,
    model_id: str | None = None,
) -> list[dict]:
    """reports_dir/<id>/rollout-<id>.* for each model id in the log (`logged`, read from
    `folder`) with shadowed rows; `classes` gives a model's class names (Classes.of)."""
    logged = {name: rows for name, rows in logged.items()
              if (rows["candidate_version"] != "").any()}  # fmt: skip
    if model_id is not None:
        logged = {k: v for k, v in logged.items() if k == model_id}
    if not logged:
        raise ReportError(
            f"the payload log in {folder} has no row a shadow candidate answered"
            f"{f' for {model_id}' if model_id else ''}: shadow a candidate (docs/rollouts.md) "
            "with PAYLOAD_LOG set"
        )
    reports = []
    for name, rows in logged.items():
        report = compare(rows, classes(name), name)
        out = Path(reports_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        for number, comparison in enumerate(report["comparisons"]):
            chosen = rows["candidate_version"] != ""
            chosen &= rows["model_version"] == comparison["serving"]
            chosen &= rows["candidate_version"] == comparison["candidate"]
            comparison["figures"] = draw(comparison, rows["pixels"][chosen], name, number, out)
        write_text(out / f"rollout-{name}.json", json.dumps(report, indent=2))
        write_text(out / f"rollout-{name}.html",
                   environment.get_template("rollout.html").render(report=report))  # fmt: skip
        reports.append(report)
    return reports
