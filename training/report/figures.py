"""The plots: matplotlib (Agg) figures of a report's numbers, written as PNG files.

draw() makes one model's plots, draw_compare() the comparison's; the pictures made of test
images themselves are in montages.py. Same numbers in, same bytes out.
"""

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, and no GUI toolkit to import
import matplotlib.pyplot as plt
import numpy as np
from scipy.cluster.hierarchy import dendrogram as scipy_dendrogram

from training.atomic import write_bytes
from training.data import Cifar100

PNG = {"metadata": {"Software": None}}  # no version stamp: same input, same bytes


def draw(report: dict, maps: dict, data: Cifar100, out: Path) -> None:
    """One model's plots into `out`; `maps` is analysis.feature_maps() of its features."""
    palette = colours(len(data.superclass_names))
    per_class(report, out)
    per_superclass(report, out)
    confusion(report, np.asarray(data.fine_to_coarse), out)
    for source, title in (("features", "mean penultimate features"), ("confusion", "confusions")):
        taxonomy(report["taxonomy"][source], title, data, palette, out / f"dendrogram_{source}.png")
    reliability(report["calibration"]["bins"], out)
    class_calibration(report["class_calibration"], data, palette, out)
    features_map(maps, data, palette, out)


def draw_compare(comparison: dict, data: Cifar100, out: Path) -> None:
    """Per pair of models, each class's accuracy under one against the other."""
    palette = colours(20)
    for n, pair in enumerate(comparison["pairs"]):
        fig, ax = plt.subplots(figsize=(7.5, 7.5))
        class_scatter(
            ax,
            pair["per_class"],
            ("small", "large"),
            pair["most_gained"][:5] + pair["least_gained"][:5],
            superclass_colour(data, palette),
        )
        ax.set(
            xlabel=f"{pair['small']}: class accuracy",
            xlim=(-0.02, 1.02),
            ylabel=f"{pair['large']}: class accuracy",
            ylim=(-0.02, 1.02),
            title="above the line: the larger model is better on the class",
        )
        legend(ax, data.superclass_names, palette, loc="upper left", bbox_to_anchor=(1, 1))
        save(fig, out / f"per_class_{n}.png")


# --- one model's plots, in the order of its page -----------------------------------------


def per_class(report: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(14, 4))
    accuracies = list(report["per_class_accuracy"].values())  # classes held out have none
    ax.bar(range(len(accuracies)), accuracies, color="#4c72b0")
    ax.axhline(report["top1_accuracy"], color="black", lw=1, ls="--", label="top-1")
    ax.set(
        xlabel="classes, best to worst", ylabel="accuracy", xlim=(-1, len(accuracies)), ylim=(0, 1)
    )
    ax.set_xticks(
        range(len(accuracies)), list(report["per_class_accuracy"]), rotation=90, fontsize=6
    )
    ax.legend()
    save(fig, out / "per_class.png")


def per_superclass(report: dict, out: Path) -> None:
    """Both superclass accuracies side by side, best superclass (of the top class) first."""
    fig, ax = plt.subplots(figsize=(11, 4.5))
    top = report["per_superclass_of_top_class_accuracy"]
    summed = report["per_superclass_summed_accuracy"]
    keys = sorted(top, key=lambda k: (-(top[k] or 0), k))
    x = np.arange(len(keys))
    ax.bar(
        x - 0.2,
        [top[k] or 0 for k in keys],
        0.4,
        color="#55a868",
        label="superclass of the top class",
    )
    ax.bar(
        x + 0.2,
        [summed[k] or 0 for k in keys],
        0.4,
        color="#c44e52",
        label="summed superclass (highest summed probability)",
    )
    ax.set_xticks(x, keys, rotation=75, fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1))
    ax.legend(fontsize=8)
    save(fig, out / "per_superclass.png")


def confusion(report: dict, to_coarse: np.ndarray, out: Path) -> None:
    # Classes grouped by superclass: errors that stay inside a superclass fall in the
    # blocks along the diagonal.
    order = np.argsort(to_coarse, kind="stable")
    matrix = np.asarray(report["confusion_matrix"])[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(9, 9))
    ax.imshow(np.log1p(matrix), cmap="magma_r", interpolation="nearest")
    for edge in np.flatnonzero(np.diff(to_coarse[order])) + 0.5:
        ax.axhline(edge, color="#3070b0", lw=0.4)
        ax.axvline(edge, color="#3070b0", lw=0.4)
    ax.set(xlabel="predicted (grouped by superclass)", ylabel="true (grouped by superclass)")
    ax.set_xticks([])
    ax.set_yticks([])
    save(fig, out / "confusion.png")


def taxonomy(result: dict, title: str, data: Cifar100, palette: list, path: Path) -> None:
    """The learned class tree, its leaves coloured by official superclass."""
    fig, ax = plt.subplots(figsize=(16, 5))
    dendrogram(
        np.asarray(result["linkage"]),
        data.class_names,
        np.asarray(data.fine_to_coarse),
        palette,
        ax,
    )
    ax.set_title(
        f"Classes clustered by their {title} (average linkage); "
        "labels coloured by official superclass",
        fontsize=10,
    )
    legend(ax, data.superclass_names, palette, loc="upper left", bbox_to_anchor=(1, 1))
    save(fig, path)


def reliability(bins: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    filled = [b for b in bins if b["count"]]
    ax.bar(
        [(b["low"] + b["high"]) / 2 for b in filled],
        [b["accuracy"] for b in filled],
        width=1 / len(bins),
        edgecolor="black",
        color="#8172b2",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    save(fig, out / "reliability.png")


def class_calibration(result: dict, data: Cifar100, palette: list, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 7))
    class_scatter(
        ax,
        result["per_class"],
        ("confidence", "accuracy"),
        result["over_confident"][:5] + result["under_confident"][:5],
        superclass_colour(data, palette),
    )
    ax.set(
        xlabel="mean confidence on the class's test images",
        ylabel="class accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title="below the line: over-confident",
    )
    save(fig, out / "class_calibration.png")


def features_map(maps: dict, data: Cifar100, palette: list, out: Path) -> None:
    """PCA (linear) beside t-SNE (neighbourhoods) of the penultimate features, same colours."""
    pca, sample, tsne = maps["pca"], maps["sample"], maps["tsne"]
    fig, axes = plt.subplots(1, 2, figsize=(16, 7.5))
    for ax, points, members_of, title in (
        (axes[0], pca, np.arange(len(pca)), "PCA: the first two principal components"),
        (axes[1], tsne, sample, f"t-SNE of {len(sample)} test images"),
    ):
        for s, name in enumerate(data.superclass_names):
            members = data.test.coarse[members_of] == s
            ax.scatter(*points[members].T, s=3, color=palette[s], label=name, alpha=0.6)
        ax.set(title=title, xticks=[], yticks=[])
    axes[1].legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    save(fig, out / "features_map.png")


def familiarity(section: dict, groups: list[dict], out: Path) -> None:
    """The familiarity of each group of images (known test images first) as a histogram
    of shares, and the threshold that accepts the RECALL share of the known ones."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    edges = np.linspace(0, 1, 21)
    for n, group in enumerate(groups):
        values = np.ravel(group["familiarity"])
        ax.hist(
            values,
            bins=edges,
            weights=np.full(len(values), 1 / len(values)),
            histtype="stepfilled" if n == 0 else "step",
            alpha=0.35 if n == 0 else 1.0,
            lw=2,
            color=plt.get_cmap("tab10")(n),
            label=f"{group['name']} ({len(values)})",
        )
    ax.axvline(
        section["threshold"],
        color="black",
        lw=1,
        ls="--",
        label=f"accepts {section['threshold_recall']:.0%} of known images",
    )
    ax.set(
        xlabel="familiarity (share of validation images less like the training data)",
        ylabel="share of the group's images",
        xlim=(0, 1),
    )
    ax.legend(fontsize=8)
    save(fig, out / "familiarity.png")


def explanations(numbers: dict, images: np.ndarray, maps: list[np.ndarray], out: Path) -> None:
    """One row per explained image: the image, then the heat maps of the true and the
    predicted class on one colour scale (red: covering there lowers the class)."""
    examples = numbers["examples"]
    fig, axes = plt.subplots(
        len(examples), 3, figsize=(7, 2.3 * len(examples)), squeeze=False, layout="constrained"
    )
    for row, (example, both) in zip(axes, zip(examples, maps, strict=True), strict=True):
        limit = max(float(np.abs(both).max()), 1e-6)
        row[0].imshow(images[example["index"]], interpolation="nearest")
        row[0].set_title(f"test #{example['index']}", fontsize=9)
        for ax, heat, key in zip(row[1:], both, ("true", "predicted"), strict=True):
            shown = ax.imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(
                f"{key}: {example[key]}\np = {example[key + '_probability']:.3f}", fontsize=9
            )
        fig.colorbar(shown, ax=row[1:].tolist(), shrink=0.8, label="drop in p")
        for ax in row:
            ax.set(xticks=[], yticks=[])
    save(fig, out / "explanations.png", tight=False)  # laid out by matplotlib as drawn


# --- pieces ------------------------------------------------------------------------------


def colours(count: int) -> list:
    cmap = plt.get_cmap("tab20")
    return [cmap(i % 20) for i in range(count)]


def superclass_colour(data: Cifar100, palette: list):
    """class name -> the colour of its superclass."""
    to_coarse = np.asarray(data.fine_to_coarse)
    index = {name: i for i, name in enumerate(data.class_names)}
    return lambda name: palette[to_coarse[index[name]]]


def class_scatter(ax, rows: list[dict], axes: tuple[str, str], named: list[dict], colour) -> None:
    """One dot per class (row[axes[0]], row[axes[1]]), the diagonal, and `named` labelled."""
    x, y = axes
    ax.scatter(
        [r[x] for r in rows], [r[y] for r in rows], s=14, c=[colour(r["class"]) for r in rows]
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    for r in named:
        ax.annotate(r["class"], (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")


def dendrogram(tree: np.ndarray, names, to_coarse, palette, ax) -> None:
    scipy_dendrogram(
        tree,
        labels=list(names),
        ax=ax,
        leaf_rotation=90,
        leaf_font_size=6,
        link_color_func=lambda _: "#666666",
    )
    index = {name: i for i, name in enumerate(names)}
    for label in ax.get_xticklabels():
        label.set_color(palette[to_coarse[index[label.get_text()]]])
    # A strip of superclass colours under the leaves, easier to read than pale labels.
    leaves = [index[label.get_text()] for label in ax.get_xticklabels()]
    ax.scatter(
        5 + 10 * np.arange(len(leaves)),
        np.zeros(len(leaves)),
        marker="s",
        s=30,
        color=[palette[to_coarse[c]] for c in leaves],
        zorder=3,
        clip_on=False,
    )
    ax.set_ylabel("distance")


def legend(ax, labels, palette, **where) -> None:
    handles = [plt.Line2D([], [], marker="s", ls="", color=palette[i]) for i in range(len(labels))]
    ax.legend(handles, labels, fontsize=7, **where)


def save(fig, path: Path, tight: bool = True) -> None:
    buffer = io.BytesIO()
    if tight:  # a figure made with layout="constrained" (colour bars over axes) is laid out
        fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, **PNG)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
