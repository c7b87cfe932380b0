"""The traffic page: what the service was asked, from its payload log (service/payloads.py).

`python -m training report --traffic DIR` reads every shard under DIR (`read_log`, which
`--compare` reads too: training/report/rollout.py) and writes, for each
model id in them, beside that model's report:

    reports/<id>/traffic.html, traffic.json (every number on the page), traffic_*.png

It compares the traffic with the training set: the class and superclass mix (of the top
class answered; chi-square goodness-of-fit tests) against the training class counts the
model file's card carries (a file exported before cards carried them needs the dataset,
--data-dir, for that part; without it the page says the comparison is unavailable),
familiarity against the uniform distribution it has on the validation set by construction
(overall and per hour or day), the mean confidence per class, the pairs of classes that
most often share an image's top two, the training classes never answered, and the most
unfamiliar images themselves.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy import stats

from contract.columns import PAYLOAD_SCHEMA
from contract.modelcard import ModelCard
from training.atomic import write_text
from training.data import Cifar100
from training.errors import ReportError
from training.report import figures, montages
from training.report.figures import plt
from training.report.pages import environment
from training.report.sentences import pct

UNFAMILIAR = 0.01  # familiarity at or below: stranger than 99 % of the validation set
SHOWN = 10  # rows in each table of classes or pairs
MONTAGE = 20  # the most unfamiliar images shown
SIGNIFICANT = 0.01  # p-value below which a difference is called a shift


def read_log(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """The payload log's rows, per model id, as arrays, oldest first."""
    paths = sorted(p for p in Path(folder).rglob("*.parquet") if not p.name.startswith("."))
    if not paths:
        raise ReportError(f"no payload shards (*.parquet) in {folder}; is PAYLOAD_LOG set?")
    table = pq.ParquetDataset(paths, schema=PAYLOAD_SCHEMA).read()
    columns = {name: table.column(name) for name in table.column_names}
    model_ids = np.asarray(columns["model_id"].to_pylist())
    times = columns["time"].cast("int64").to_numpy().astype("datetime64[ms]")
    order = np.argsort(times, kind="stable")
    rows = {
        "time": times,
        "model_id": model_ids,
        "model_version": np.asarray(columns["model_version"].to_pylist()),
        "route": np.asarray(columns["route"].to_pylist()),
        "pixels": np.frombuffer(b"".join(columns["pixels"].to_pylist()), np.uint8).reshape(
            -1, 32, 32, 3
        ),
        "top_classes": np.asarray(columns["top_classes"].to_pylist(), dtype=np.int64),
        "top_probabilities": np.asarray(columns["top_probabilities"].to_pylist(), np.float32),
        "familiarity": floats(columns["familiarity"].to_pylist()),
        # The version's time, and a shadow candidate's answer where there was one (columns
        # added with shadowing: null in older shards, and on rows not shadowed).
        "latency_ms": floats(columns["latency_ms"].to_pylist()),
        "candidate_version": np.asarray(
            [v or "" for v in columns["candidate_version"].to_pylist()]
        ),
        "candidate_top1": np.asarray(
            [-1 if v is None else v[0] for v in columns["candidate_top_classes"].to_pylist()],
            np.int64,
        ),
        "candidate_probability": floats(
            [
                None if v is None else v[0]
                for v in columns["candidate_top_probabilities"].to_pylist()
            ]
        ),
        "candidate_familiarity": floats(columns["candidate_familiarity"].to_pylist()),
        "candidate_latency_ms": floats(columns["candidate_latency_ms"].to_pylist()),
    }
    rows = {name: values[order] for name, values in rows.items()}
    return {
        model_id: {name: values[rows["model_id"] == model_id] for name, values in rows.items()}
        for model_id in sorted(set(model_ids.tolist()))
    }


def floats(values: list) -> np.ndarray:
    """float32, null as NaN."""
    return np.asarray([np.nan if v is None else v for v in values], np.float32)


@dataclass(frozen=True)
class Classes:
    """What the page needs to know of the training set: the class names, the superclass of
    each class and, when known, how many training images each class had."""

    names: list[str]
    superclass_names: list[str]
    fine_to_coarse: list[int]
    train_counts: np.ndarray | None  # [classes]; None: the mix comparison is unavailable
    source: str  # where the counts came from, for the page

    @classmethod
    def of(cls, card: ModelCard | None, data: Cifar100 | None) -> "Classes":
        """From the model file's card (names and counts), else the dataset; the counts from
        the dataset only when the card has none."""
        if card is None and data is None:
            raise ReportError(
                "the page needs the model file (its card names the classes and "
                "counts the training images): none in --models-dir; give the folder that "
                "holds it, or the dataset with --data-dir"
            )
        names = card or data
        counts, source = None, "nowhere: unavailable"
        if card is not None and card.training_class_counts is not None:
            counts, source = np.asarray(card.training_class_counts), "the model card"
        elif data is not None:
            counts = np.bincount(data.train.fine, minlength=len(data.class_names))
            source = f"the dataset ({data.source})"
        return cls(names.class_names, names.superclass_names, list(names.fine_to_coarse),
                   counts, source)  # fmt: skip


def analyse(rows: dict[str, np.ndarray], classes: Classes, model_id: str) -> dict:
    """Every number of one model's traffic page."""
    top1 = rows["top_classes"][:, 0]
    n = len(top1)
    to_coarse = np.asarray(classes.fine_to_coarse)
    names = classes.names
    traffic_classes = np.bincount(top1, minlength=len(names))
    traffic_super = np.bincount(to_coarse[top1], minlength=len(classes.superclass_names))
    versions, version_counts = np.unique(rows["model_version"], return_counts=True)
    routes, route_counts = np.unique(rows["route"], return_counts=True)
    report = {
        "model_id": model_id,
        "images": n,
        "first": str(rows["time"][0]) + "Z",
        "last": str(rows["time"][-1]) + "Z",
        "versions": dict(zip(versions.tolist(), version_counts.tolist(), strict=True)),
        "routes": dict(zip(routes.tolist(), route_counts.tolist(), strict=True)),
        "training_counts_from": classes.source,
        "classes": {"available": False},
        "superclasses": {"available": False},
        "never_answered": None,
        "confidence": confidence(top1, rows["top_probabilities"][:, 0], names),
        "top2_pairs": top2_pairs(rows["top_classes"], names, n),
        "familiarity": familiarity(rows["familiarity"], rows["time"]),
    }
    if classes.train_counts is not None:
        train_classes = classes.train_counts
        supers = len(classes.superclass_names)
        train_super = np.bincount(to_coarse, train_classes, supers).astype(np.int64)
        report["classes"] = mix(traffic_classes, train_classes, names)
        report["superclasses"] = mix(traffic_super, train_super, classes.superclass_names)
        report["never_answered"] = [
            names[i] for i in np.flatnonzero((traffic_classes == 0) & (train_classes > 0))
        ]
    report["findings"] = findings(report)
    return report


def mix(traffic: np.ndarray, train: np.ndarray, names: list[str]) -> dict:
    """Each category's share in traffic and in training, and a chi-square test of the
    traffic's counts against the training shares (over the categories training has)."""
    n = int(traffic.sum())
    kept = train > 0
    # Images answered with a class training never had are outside the test (named below).
    expected = train[kept] / train[kept].sum() * traffic[kept].sum()
    test = stats.chisquare(traffic[kept], expected)
    rows = [
        {
            "name": name,
            "traffic": int(t),
            "traffic_share": float(t / n),
            "train_share": float(s / train.sum()),
            "ratio": float((t / n) / (s / train.sum())) if s else None,
        }
        for name, t, s in zip(names, traffic, train, strict=True)
    ]
    ranked = sorted((r for r in rows if r["ratio"] is not None), key=lambda r: -r["ratio"])
    return {
        "available": True,
        "rows": rows,
        "chi_square": float(test.statistic),
        "degrees_of_freedom": int(kept.sum() - 1),
        "p_value": float(test.pvalue),
        "shifted": bool(test.pvalue < SIGNIFICANT),
        # The approximation wants about 5 expected per category; below, say so.
        "min_expected": float(expected.min()),
        "most_over": [r for r in ranked if r["ratio"] > 1][:SHOWN],
        "most_under": [r for r in reversed(ranked) if r["ratio"] < 1][:SHOWN],
        "outside_training": [r["name"] for r in rows if r["ratio"] is None and r["traffic"]],
    }


def confidence(top1: np.ndarray, top_probability: np.ndarray, names: list[str]) -> list[dict]:
    """Per class answered: images and the mean probability of the answer, least sure first."""
    rows = [
        {"class": names[c], "images": int((top1 == c).sum()),
         "mean": float(top_probability[top1 == c].mean())}
        for c in np.unique(top1)
    ]  # fmt: skip
    return sorted(rows, key=lambda r: (r["mean"], r["class"]))


def top2_pairs(top_classes: np.ndarray, names: list[str], n: int) -> list[dict]:
    """The pairs of classes that most often are an image's two most probable."""
    pairs = np.sort(top_classes[:, :2], axis=1)
    found, counts = np.unique(pairs, axis=0, return_counts=True)
    order = np.lexsort((found[:, 1], found[:, 0], -counts))[:SHOWN]
    return [
        {"a": names[found[i, 0]], "b": names[found[i, 1]], "images": int(counts[i]),
         "share": float(counts[i] / n)}
        for i in order
    ]  # fmt: skip


def familiarity(values: np.ndarray, times: np.ndarray) -> dict:
    """Against Uniform(0, 1), its distribution on the validation set: the share at or
    below UNFAMILIAR (binomial test against UNFAMILIAR itself) and a Kolmogorov-Smirnov
    test, overall and per hour (per day when the log spans more than two days)."""
    known = ~np.isnan(values)
    if not known.any():
        return {"available": False}
    values, times = values[known], times[known]
    span = times[-1] - times[0]
    unit = "h" if span <= np.timedelta64(2, "D") else "D"
    buckets = times.astype(f"datetime64[{unit}]")
    per_bucket = []
    for bucket in np.unique(buckets):
        part = values[buckets == bucket]
        per_bucket.append({"start": str(bucket.astype("datetime64[m]")) + "Z",
                           **uniform_test(part)})  # fmt: skip
    order = np.argsort(values, kind="stable")
    return {
        "available": True,
        "bucket": "hour" if unit == "h" else "day",
        "overall": uniform_test(values),
        "per_bucket": per_bucket,
        # Rows of the log (oldest first), for the montage.
        "most_unfamiliar": [
            {"row": int(row), "familiarity": float(value)}
            for row, value in zip(
                np.flatnonzero(known)[order[:MONTAGE]], values[order[:MONTAGE]], strict=True
            )
        ],
    }


def uniform_test(values: np.ndarray) -> dict:
    below = int((values <= UNFAMILIAR).sum())
    return {
        "images": len(values),
        "unfamiliar": below,
        "unfamiliar_share": below / len(values),
        "unfamiliar_p_value": float(stats.binomtest(below, len(values), UNFAMILIAR).pvalue),
        "median": float(np.median(values)),
        "ks_statistic": float(stats.kstest(values, "uniform").statistic),
        "ks_p_value": float(stats.kstest(values, "uniform").pvalue),
    }


def findings(report: dict) -> dict:
    """The page's sentences, every number from the report."""
    said = {}
    for key, what in (("classes", "class"), ("superclasses", "superclass")):
        m = report[key]
        if not m["available"]:
            said[key] = (
                f"The {what} mix cannot be compared with the training set's: the model file "
                "was exported before its card counted the training images, and no dataset "
                "was given (--data-dir)."
            )
            continue
        test = (f"chi-square {m['chi_square']:.1f} on {m['degrees_of_freedom']} degrees of "
                f"freedom, p = {m['p_value']:.3g}")  # fmt: skip
        if m["shifted"]:
            over = ", ".join(f"{r['name']} ({r['ratio']:.1f}x)" for r in m["most_over"][:3])
            said[key] = (f"The {what} mix of the traffic differs from the training set's "
                         f"({test}); most over-represented: {over}.")  # fmt: skip
        else:
            said[key] = (f"No shift in the {what} mix from the training set's is detected "
                         f"({test}, threshold {SIGNIFICANT}).")  # fmt: skip
        if m["min_expected"] < 5:
            said[key] += (
                f" The smallest expected count is {m['min_expected']:.1f}, below the 5 the "
                "chi-square approximation wants: read the p-value as rough."
            )
    f = report["familiarity"]
    if f["available"]:
        o = f["overall"]
        said["familiarity"] = (
            f"{o['unfamiliar']} of {o['images']} images ({pct(o['unfamiliar_share'])}) have a "
            f"familiarity of at most {UNFAMILIAR}, against {pct(UNFAMILIAR)} of the validation "
            f"set (binomial p = {o['unfamiliar_p_value']:.3g}); median familiarity "
            f"{o['median']:.3f} against 0.5 (Kolmogorov-Smirnov D = {o['ks_statistic']:.3f}, "
            f"p = {o['ks_p_value']:.3g})."
        )
    else:
        said["familiarity"] = "The model file has no familiarity output: nothing to compare."
    never = report["never_answered"]
    if never is None:
        said["never_answered"] = "Which training classes were never the answer is unknown."
    else:
        said["never_answered"] = (
            f"{len(never)} of the training set's classes were never the answer."
            if never else "Every training class was the answer at least once."
        )  # fmt: skip
    return said


def draw(report: dict, rows: dict[str, np.ndarray], names: list[str], out: Path) -> None:
    """The mixes, the familiarity and the most unfamiliar images, as PNG files."""
    for key, path in (("superclasses", "traffic_superclasses.png"),
                      ("classes", "traffic_classes.png")):  # fmt: skip
        if not report[key]["available"]:
            continue
        m = report[key]["rows"]
        fig, ax = plt.subplots(figsize=(12 if key == "classes" else 9, 4.5))
        x = np.arange(len(m))
        ax.bar(x, [r["traffic_share"] for r in m], color="tab:blue", label="traffic")
        ax.step(x, [r["train_share"] for r in m], where="mid", color="black", label="training")
        ax.set_xticks(x, [r["name"] for r in m], rotation=90, fontsize=5 if len(m) > 20 else 7)
        ax.set(ylabel="share of images", title=f"{key}: traffic (top class) and training")
        ax.legend(fontsize=8)
        figures.save(fig, out / path)
    f = report["familiarity"]
    if not f["available"]:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    values = rows["familiarity"][~np.isnan(rows["familiarity"])]
    left.hist(values, bins=np.linspace(0, 1, 21), weights=np.full(len(values), 1 / len(values)))
    left.axhline(1 / 20, color="black", ls="--", lw=1, label="validation (uniform)")
    left.set(xlabel="familiarity", ylabel="share of images", xlim=(0, 1))
    left.legend(fontsize=8)
    buckets = f["per_bucket"]
    right.plot(range(len(buckets)), [b["unfamiliar_share"] for b in buckets], marker="o")
    right.axhline(UNFAMILIAR, color="black", ls="--", lw=1, label="validation")
    right.set_xticks(range(len(buckets)), [b["start"] for b in buckets], rotation=90, fontsize=6)
    right.set(ylabel=f"share at most {UNFAMILIAR}", title=f"per {f['bucket']}", ylim=(0, None))
    right.legend(fontsize=8)
    figures.save(fig, out / "traffic_familiarity.png")
    shown = [
        (rows["pixels"][i], f"familiarity {rows['familiarity'][i]:.4f}\n"
         f"{names[rows['top_classes'][i, 0]]} {rows['top_probabilities'][i, 0]:.2f}")
        for i in (image["row"] for image in f["most_unfamiliar"])
    ]  # fmt: skip
    montages.save_image(montages.tiles(shown), out / "traffic_unfamiliar.png")


def write_traffic(
    logged: dict[str, dict[str, np.ndarray]],
    cards: dict[str, ModelCard],
    data: Cifar100 | None,
    reports_dir: Path,
) -> list[dict]:
    """reports_dir/<id>/traffic.* for each model id in `logged` (read_log's), the training
    set described by that model's card in `cards` (by model id), else by `data`."""
    reports = []
    for name, rows in logged.items():
        classes = Classes.of(cards.get(name), data)
        report = analyse(rows, classes, name)
        out = Path(reports_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        draw(report, rows, classes.names, out)
        write_text(out / "traffic.json", json.dumps(report, indent=2))
        write_text(out / "traffic.html",
                   environment.get_template("traffic.html").render(report=report))  # fmt: skip
        reports.append(report)
    return reports
