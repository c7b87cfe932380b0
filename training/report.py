"""What makes a 100-class dataset hard: a report on one exported model.

Runs the ONNX file over the test set and writes reports/<model id>/:
    report.json   every number on the page
    index.html    the page, fully offline: plots are PNG files beside it
    *.png         the plots and image montages (matplotlib Agg, deterministic)
"""

import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image
from tqdm import tqdm

from service.classifier import Classifier
from service.modelcard import INPUT_NAME, OUTPUT_NAME
from training.atomic import write_bytes, write_text
from training.data import Cifar100
from training.evaluate import compute_metrics
from training.export import FEATURES_NAME
from training.models import ORIGINAL_ACCURACY

CALIBRATION_BINS = 15
NEAR_DUPLICATE_BITS = 2  # of 64: dHash distance at or below which two images count as near
PNG = {"metadata": {"Software": None}}  # no version stamp: same input, same bytes


def write_report(model_path: Path, data: Cifar100, out_dir: Path) -> dict:
    model = Classifier(model_path, "auto", intra_op_threads=0, inter_op_threads=1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities, features = score(model, data.test.images)
    report = analyse(model.model_id, probabilities, features, data)
    draw(report, probabilities, features, data, out_dir)
    write_text(out_dir / "report.json", json.dumps(report, indent=2))
    write_text(out_dir / "index.html", render(report))
    return report


def score(model: Classifier, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    probabilities, features = [], []
    for start in tqdm(range(0, len(images), batch), desc=f"Scoring {model.model_id}", unit="batch"):
        p, f = model.session.run(
            [OUTPUT_NAME, FEATURES_NAME], {INPUT_NAME: images[start : start + batch]}
        )
        probabilities.append(p)
        features.append(f)
    return np.concatenate(probabilities), np.concatenate(features)


# --- numbers ---------------------------------------------------------------------------


def analyse(model_id: str, probabilities: np.ndarray, features: np.ndarray, data: Cifar100) -> dict:
    test, names, supernames = data.test, data.class_names, data.superclass_names
    to_coarse = np.asarray(data.fine_to_coarse)
    metrics = compute_metrics(probabilities, test.fine, data.fine_to_coarse, names, supernames)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((100, 100), dtype=np.int64)
    np.add.at(confusion, (test.fine, predicted), 1)

    errors = predicted != test.fine
    within = to_coarse[predicted[errors]] == to_coarse[test.fine[errors]]
    # An error picks one of the 99 other classes; 4 of them share the true superclass.
    chance = float(np.mean([(np.sum(to_coarse == to_coarse[c]) - 1) / 99 for c in range(100)]))

    off_diagonal = confusion * (1 - np.eye(100, dtype=np.int64))
    order = np.argsort(-off_diagonal, axis=None, kind="stable")[:20]
    pairs = [
        {"true": names[t], "predicted": names[p], "count": int(off_diagonal[t, p]),
         "same_superclass": bool(to_coarse[t] == to_coarse[p])}
        for t, p in zip(*np.unravel_index(order, confusion.shape), strict=True)
    ]  # fmt: skip

    per_class = sorted(metrics["per_class_accuracy"].items(), key=lambda kv: (-kv[1], kv[0]))
    # The official training file is our train split plus the held-out validation images.
    training_file = (
        np.concatenate([data.train.images, data.val.images]),
        np.concatenate([data.train.fine, data.val.fine]),
    )
    exact, near = duplicates(test.images, training_file[0])
    return {
        "model_id": model_id,
        "images": len(test),
        "top1_accuracy": metrics["top1_accuracy"],
        "top5_accuracy": metrics["top5_accuracy"],
        "superclass_accuracy": metrics["superclass_accuracy"],
        "original_accuracy": ORIGINAL_ACCURACY[model_id],
        "per_class_accuracy": dict(per_class),
        "best_classes": [name for name, _ in per_class[:10]],
        "worst_classes": [name for name, _ in per_class[-10:]],
        "per_superclass_accuracy": metrics["per_superclass_accuracy"],
        "confusion_matrix": confusion.tolist(),
        "errors": int(errors.sum()),
        "errors_within_superclass": float(within.mean()) if errors.any() else None,
        "errors_within_superclass_by_chance": chance,
        "most_confused_pairs": pairs,
        "calibration": calibration(probabilities, test.fine),
        "dataset": {
            "train_images_per_class": np.bincount(training_file[1], minlength=100).tolist(),
            "test_images_per_class": np.bincount(test.fine, minlength=100).tolist(),
            "mean_colour_per_class": [
                [round(float(v), 1) for v in test.images[test.fine == c].mean(axis=(0, 1, 2))]
                for c in range(100)
            ],
            "test_with_exact_duplicate_in_train": exact,
            "test_with_near_duplicate_in_train": near,
            "near_duplicate_max_bits": NEAR_DUPLICATE_BITS,
        },
    }


def calibration(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Reliability bins over top-1 confidence and the expected calibration error."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, CALIBRATION_BINS - 1)
    bins, ece = [], 0.0
    for b in range(CALIBRATION_BINS):
        members = index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        mean_confidence = float(confidence[members].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(accuracy - mean_confidence)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "accuracy": accuracy, "confidence": mean_confidence})  # fmt: skip
    return {"expected_calibration_error": ece, "bins": bins}


def dhash(images: np.ndarray) -> np.ndarray:
    """64-bit difference hashes: is each pixel of a 9x8 grey thumbnail brighter than the next?"""
    hashes = np.empty(len(images), dtype=np.uint64)
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    for i, image in enumerate(images):
        small = np.asarray(Image.fromarray(image).convert("L").resize((9, 8), Image.Resampling.BOX))
        bits = (small[:, 1:] > small[:, :-1]).ravel()
        hashes[i] = np.sum(weights[bits])
    return hashes


def duplicates(test: np.ndarray, train: np.ndarray) -> tuple[int, int]:
    """How many test images have an exact, or a near (perceptual hash), twin in train."""
    train_bytes = {image.tobytes() for image in train}
    exact = sum(image.tobytes() in train_bytes for image in test)
    train_hashes = dhash(train)
    near = 0
    for h in dhash(test):
        near += bool((np.bitwise_count(train_hashes ^ h) <= NEAR_DUPLICATE_BITS).any())
    return int(exact), int(near)


# --- pictures --------------------------------------------------------------------------


def draw(report: dict, probabilities: np.ndarray, features: np.ndarray, data: Cifar100, out: Path):
    names, to_coarse = data.class_names, np.asarray(data.fine_to_coarse)
    test = data.test
    predicted = probabilities.argmax(axis=1)

    fig, ax = plt.subplots(figsize=(14, 4))
    accuracies = list(report["per_class_accuracy"].values())
    ax.bar(range(100), accuracies, color="#4c72b0")
    ax.axhline(report["top1_accuracy"], color="black", lw=1, ls="--", label="top-1")
    ax.set(xlabel="classes, best to worst", ylabel="accuracy", xlim=(-1, 100), ylim=(0, 1))
    ax.set_xticks(range(100), list(report["per_class_accuracy"]), rotation=90, fontsize=6)
    ax.legend()
    save(fig, out / "per_class.png")

    fig, ax = plt.subplots(figsize=(10, 4))
    items = sorted(report["per_superclass_accuracy"].items(), key=lambda kv: -kv[1])
    ax.bar([k for k, _ in items], [v for _, v in items], color="#55a868")
    ax.set(ylabel="accuracy", ylim=(0, 1))
    ax.tick_params(axis="x", rotation=75, labelsize=8)
    save(fig, out / "per_superclass.png")

    # Confusion matrix with classes grouped by superclass: errors that stay inside a
    # superclass fall in the blocks along the diagonal.
    order = np.argsort(to_coarse, kind="stable")
    confusion = np.asarray(report["confusion_matrix"])[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(9, 9))
    ax.imshow(np.log1p(confusion), cmap="magma_r", interpolation="nearest")
    for edge in np.flatnonzero(np.diff(to_coarse[order])) + 0.5:
        ax.axhline(edge, color="#3070b0", lw=0.4)
        ax.axvline(edge, color="#3070b0", lw=0.4)
    ax.set(xlabel="predicted (grouped by superclass)", ylabel="true (grouped by superclass)")
    ax.set_xticks([])
    ax.set_yticks([])
    save(fig, out / "confusion.png")

    bins = report["calibration"]["bins"]
    fig, ax = plt.subplots(figsize=(5, 5))
    filled = [b for b in bins if b["count"]]
    ax.bar([(b["low"] + b["high"]) / 2 for b in filled], [b["accuracy"] for b in filled],
           width=1 / len(bins), edgecolor="black", color="#8172b2", label="accuracy")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    save(fig, out / "reliability.png")

    # Penultimate features projected on their first two principal components.
    centred = features - features.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    points = centred @ components[:2].T
    fig, ax = plt.subplots(figsize=(9, 8))
    colours = plt.get_cmap("tab20")
    for s, name in enumerate(data.superclass_names):
        members = test.coarse == s
        ax.scatter(*points[members].T, s=3, color=colours(s), label=name, alpha=0.6)
    ax.set(xlabel="PC 1", ylabel="PC 2")
    ax.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    save(fig, out / "features_pca.png")

    mean_colours = np.asarray(report["dataset"]["mean_colour_per_class"], dtype=np.uint8)
    swatches = mean_colours.reshape(10, 10, 3).repeat(24, axis=0).repeat(24, axis=1)
    save_image(swatches, out / "mean_colours.png")

    index = {name: i for i, name in enumerate(names)}
    for group in ("best_classes", "worst_classes"):
        rows = [test.images[test.fine == index[name]][:6] for name in report[group]]
        save_image(montage(rows), out / f"{group}.png")
    confused_rows = []
    for pair in report["most_confused_pairs"]:
        hits = (test.fine == index[pair["true"]]) & (predicted == index[pair["predicted"]])
        confused_rows.append(test.images[hits][:6])
    save_image(montage(confused_rows), out / "confused_pairs.png")


def montage(rows: list[np.ndarray], columns: int = 6, scale: int = 2) -> np.ndarray:
    """One row of up to `columns` images per entry, on white, each image upscaled."""
    size = 32 * scale + 4
    canvas = np.full((len(rows) * size, columns * size, 3), 255, dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, image in enumerate(images[:columns]):
            big = image.repeat(scale, axis=0).repeat(scale, axis=1)
            top, left = r * size + 2, c * size + 2
            canvas[top : top + 32 * scale, left : left + 32 * scale] = big
    return canvas


def save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, **PNG)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def save_image(pixels: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    write_bytes(path, buffer.getvalue())


# --- the page --------------------------------------------------------------------------


def render(report: dict) -> str:
    e = html.escape
    pct = "{:.1%}".format
    top = [
        ("top-1 accuracy", pct(report["top1_accuracy"])),
        ("top-5 accuracy", pct(report["top5_accuracy"])),
        ("superclass accuracy", pct(report["superclass_accuracy"])),
        ("original experiment (validation, 48 epochs)", pct(report["original_accuracy"])),
        (
            "expected calibration error",
            f"{report['calibration']['expected_calibration_error']:.4f}",
        ),
    ]
    headline = "".join(f'<tr><th>{k}</th><td class="num">{v}</td></tr>' for k, v in top)
    within = report["errors_within_superclass"]
    d = report["dataset"]
    per_class = "".join(
        f'<tr><td>{e(name)}</td><td class="num">{pct(acc)}</td></tr>'
        for name, acc in report["per_class_accuracy"].items()
    )
    per_super = "".join(
        f'<tr><td>{e(name)}</td><td class="num">{pct(acc)}</td></tr>'
        for name, acc in report["per_superclass_accuracy"].items()
    )
    pairs = "".join(
        f"<tr><td>{i + 1}</td><td>{e(p['true'])}</td><td>{e(p['predicted'])}</td>"
        f'<td class="num">{p["count"]}</td><td>{"yes" if p["same_superclass"] else "no"}</td></tr>'
        for i, p in enumerate(report["most_confused_pairs"])
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{e(report["model_id"])}: what makes CIFAR-100 hard</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 2px 10px; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; }}
.cols {{ display: flex; gap: 3em; flex-wrap: wrap; }}
</style></head><body>
<h1>{e(report["model_id"])}: what makes a 100-class dataset hard</h1>
<p>{report["images"]} test images, scored by the exported ONNX model.</p>
<table id="headline">{headline}</table>

<h2>Classes</h2>
<p>Per-class accuracy, best to worst. Their mean is the top-1 accuracy.</p>
<img src="per_class.png" alt="per-class accuracy">
<div class="cols">
<div><h3>10 best classes</h3><p>{", ".join(map(e, report["best_classes"]))}</p>
<img src="best_classes.png" alt="test images of the 10 best classes, one class per row"></div>
<div><h3>10 worst classes</h3><p>{", ".join(map(e, report["worst_classes"]))}</p>
<img src="worst_classes.png" alt="test images of the 10 worst classes, one class per row"></div>
</div>
<h3>Superclasses</h3>
<img src="per_superclass.png" alt="per-superclass accuracy">

<h2>Confusions</h2>
<p>The confusion matrix with classes grouped by superclass (log scale). Of the
{report["errors"]} errors, <b id="within">{pct(within) if within is not None else "n/a"}</b>
stay inside the true superclass, where chance would put
<b id="chance">{pct(report["errors_within_superclass_by_chance"])}</b>: mistakes are mostly
between similar things.</p>
<img src="confusion.png" alt="confusion matrix grouped by superclass">
<h3>The 20 most confused pairs</h3>
<table><tr><th>#</th><th>true</th><th>predicted</th><th>count</th><th>same superclass</th></tr>
{pairs}</table>
<p>Examples, one row per pair in the order above (true class images predicted as the other):</p>
<img src="confused_pairs.png" alt="confused test images, one row per pair">

<h2>Calibration</h2>
<p>Expected calibration error {report["calibration"]["expected_calibration_error"]:.4f}
over {len(report["calibration"]["bins"])} confidence bins.</p>
<img src="reliability.png" alt="reliability diagram">

<h2>Features</h2>
<p>The penultimate layer's activations, projected on their first two principal
components and coloured by superclass.</p>
<img src="features_pca.png" alt="PCA of penultimate features">

<h2>The dataset</h2>
<p>Training images per class: {min(d["train_images_per_class"])} to
{max(d["train_images_per_class"])}; test images per class: {min(d["test_images_per_class"])}
to {max(d["test_images_per_class"])}. Test images with an exact duplicate in the training
set: <b id="exact">{d["test_with_exact_duplicate_in_train"]}</b>; with a near duplicate
(64-bit difference hash within {d["near_duplicate_max_bits"]} bits):
<b id="near">{d["test_with_near_duplicate_in_train"]}</b>. Near duplicates inflate test
scores: the model may have seen the answer.</p>
<p>Mean colour of each class's test images (row by row, class 0 at top left):</p>
<img src="mean_colours.png" alt="mean colour per class">

<div class="cols">
<div><h3>Per-class accuracy</h3><table>{per_class}</table></div>
<div><h3>Per-superclass accuracy</h3><table>{per_super}</table></div>
</div>
<p>Every number on this page is in <a href="report.json">report.json</a>.</p>
</body></html>
"""
