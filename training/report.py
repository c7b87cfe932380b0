"""What characterises a 100-class dataset, seen through our exported models.

Runs each ONNX file over the test set and writes, offline and deterministically:
    reports/<model id>/   index.html, report.json (every number on the page), *.png
    reports/compare/      the same for all exported models side by side (2 or more)
The measures are in training/findings.py; this module turns them into numbers in JSON,
sentences derived from those numbers, plots (matplotlib Agg) and captioned montages.
"""

import html
import io
import json
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from service.classifier import Classifier
from service.modelcard import FEATURES_NAME, INPUT_NAME, OUTPUT_NAME
from training import findings
from training.atomic import write_bytes, write_text
from training.data import Cifar100
from training.evaluate import compute_metrics
from training.models import ORIGINAL_ACCURACY

COMPARE_DIR = "compare"
CALIBRATION_BINS = 15
CLUSTERS = 20  # cut of the learned class tree, as many groups as official superclasses
NEAREST_K = 4  # each class's nearest classes; a superclass has 4 other classes
SIGNIFICANCE = 0.01  # binomial test level for "more (or less) than chance"
NEAR_DUPLICATE_MAX_RMS = 8.0  # root mean square pixel difference (0-255) for "near"
OLD_HASH_BITS = 2  # the former test: 64-bit difference hashes within this many bits
SHOWN = 20  # label-issue candidates, uncertain images, gain/loss classes shown
TSNE_POINTS = 3000  # t-SNE runs on at most this many test images (a fixed sample)
SEED = 0
PNG = {"metadata": {"Software": None}}  # no version stamp: same input, same bytes


def write_reports(model_paths: list[Path], data: Cifar100, reports_dir: Path) -> list[dict]:
    """reports_dir/<id>/ for each model; reports_dir/compare/ when there are 2 or more."""
    reports_dir = Path(reports_dir)
    dataset = describe_dataset(data)
    reports, scored = [], []
    for path in model_paths:
        model = Classifier(path, "auto", intra_op_threads=0, inter_op_threads=1)
        probabilities, features = score(model, data.test.images)
        report = analyse(model.model_id, model.card.parameter_count, probabilities, features, data)
        report["dataset"] = dataset
        maps = feature_maps(features)
        report["feature_maps"] = maps["numbers"]
        out = reports_dir / model.model_id
        out.mkdir(parents=True, exist_ok=True)
        draw(report, probabilities, maps, data, out)
        write_text(out / "report.json", json.dumps(report, indent=2))
        write_text(out / "index.html", render(report))
        reports.append(report)
        scored.append((model.model_id, model.card.parameter_count, probabilities.argmax(axis=1)))
    if len(scored) > 1:
        out = reports_dir / COMPARE_DIR
        out.mkdir(parents=True, exist_ok=True)
        comparison = compare(scored, data)
        draw_compare(comparison, data, out)
        write_text(out / "report.json", json.dumps(comparison, indent=2))
        write_text(out / "index.html", render_compare(comparison))
    return reports


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


def analyse(
    model_id: str, parameters: int, probabilities: np.ndarray, features: np.ndarray, data: Cifar100
) -> dict:
    test, names, supernames = data.test, data.class_names, data.superclass_names
    to_coarse = np.asarray(data.fine_to_coarse)
    metrics = compute_metrics(probabilities, test.fine, data.fine_to_coarse, names, supernames)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((100, 100), dtype=np.int64)
    np.add.at(confusion, (test.fine, predicted), 1)

    off_diagonal = confusion * (1 - np.eye(100, dtype=np.int64))
    order = np.argsort(-off_diagonal, axis=None, kind="stable")[:20]
    pairs = [
        {
            "true": names[t],
            "predicted": names[p],
            "count": int(off_diagonal[t, p]),
            "same_superclass": bool(to_coarse[t] == to_coarse[p]),
        }
        for t, p in zip(*np.unravel_index(order, confusion.shape), strict=True)
        if off_diagonal[t, p] > 0
    ]

    per_class = sorted(metrics["per_class_accuracy"].items(), key=lambda kv: (-kv[1], kv[0]))
    counts = np.bincount(test.fine, minlength=100)
    mean_per_class = float(np.mean([acc for _, acc in per_class]))
    within = findings.within_superclass(test.fine, predicted, to_coarse)

    entropy = findings.entropy_bits(probabilities)
    correct = predicted == test.fine
    uncertain = findings.most_uncertain(probabilities, SHOWN)
    issues = findings.label_issues(test.fine, probabilities, SHOWN)
    for candidate in issues["candidates"]:
        candidate["given"] = names[candidate["given"]]
        candidate["suggested"] = names[candidate["suggested"]]

    report = {
        "model_id": model_id,
        "parameter_count": parameters,
        "images": len(test),
        "classes": 100,
        "superclasses": 20,
        "original_epochs": 48,
        "classes_shown": 10,  # best and worst
        "images_per_row": 6,
        "top1_accuracy": metrics["top1_accuracy"],
        "top5_accuracy": metrics["top5_accuracy"],
        "superclass_of_top_class_accuracy": metrics["superclass_of_top_class_accuracy"],
        "summed_superclass_accuracy": metrics["summed_superclass_accuracy"],
        "original_accuracy": ORIGINAL_ACCURACY[model_id],
        "per_class_accuracy": dict(per_class),
        "mean_per_class_accuracy": mean_per_class,
        "test_images_per_class_equal": bool(counts.min() == counts.max()),
        "best_classes": [name for name, _ in per_class[:10]],
        "worst_classes": [name for name, _ in per_class[-10:]],
        "per_superclass_of_top_class_accuracy": metrics["per_superclass_of_top_class_accuracy"],
        "per_superclass_summed_accuracy": metrics["per_superclass_summed_accuracy"],
        "confusion_matrix": confusion.tolist(),
        "errors_within_superclass": within,
        "significance_level": SIGNIFICANCE,
        "most_confused_pairs": pairs,
        "calibration": calibration(probabilities, test.fine),
        "class_calibration": class_calibration(probabilities, test.fine, names),
        "uncertainty": {
            "max_entropy_bits": float(np.log2(100)),
            "mean_entropy_bits": float(entropy.mean()),
            "mean_entropy_bits_correct": float(entropy[correct].mean()) if correct.any() else None,
            "mean_entropy_bits_wrong": float(entropy[~correct].mean())
            if (~correct).any()
            else None,
            "most_uncertain": [
                {
                    "index": int(i),
                    "true": names[test.fine[i]],
                    "predicted": names[predicted[i]],
                    "probability": float(probabilities[i].max()),
                    "entropy_bits": float(entropy[i]),
                }
                for i in uncertain
            ],
        },
        "label_issues": issues,
        "taxonomy": {
            "features": recovery(
                findings.cosine_distances(findings.class_means(features, test.fine, 100)), data
            ),
            "confusion": recovery(findings.confusion_distances(confusion), data),
        },
    }
    report["findings"] = sentences(report)
    return report


def recovery(distances: np.ndarray, data: Cifar100) -> dict:
    """findings.superclass_recovery with class and superclass names instead of indices."""
    names, supernames = data.class_names, data.superclass_names
    result = findings.superclass_recovery(
        distances, np.asarray(data.fine_to_coarse), CLUSTERS, NEAREST_K
    )
    result["split_superclasses"] = [
        {
            "superclass": supernames[item["superclass"]],
            "parts": [[names[c] for c in part] for part in item["parts"]],
        }
        for item in result["split_superclasses"]
    ]
    result["closest_cross_superclass_pairs"] = [
        {
            "a": names[p["a"]],
            "b": names[p["b"]],
            "distance": p["distance"],
            "superclass_a": supernames[data.fine_to_coarse[p["a"]]],
            "superclass_b": supernames[data.fine_to_coarse[p["b"]]],
            "same_cluster": result["groups"][p["a"]] == result["groups"][p["b"]],
        }
        for p in result["closest_cross_superclass_pairs"]
    ]
    result["requested_clusters"] = CLUSTERS
    return result


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
        bins.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return {
        "expected_calibration_error": ece,
        "mean_confidence": float(confidence.mean()),
        "accuracy": float(correct.mean()),
        "bins": bins,
    }


def class_calibration(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Per class mean confidence against accuracy; the 10 most over- and under-confident."""
    per = findings.per_class_calibration(probabilities, labels, len(names))
    rows = [
        {
            "class": names[c],
            "images": per["images"][c],
            "accuracy": per["accuracy"][c],
            "confidence": per["confidence"][c],
            "gap": per["gap"][c],
        }
        for c in range(len(names))
        if per["images"][c]
    ]
    by_gap = sorted(rows, key=lambda r: (-r["gap"], r["class"]))
    return {
        "per_class": rows,
        "over_confident": [r for r in by_gap if r["gap"] > 0][:10],
        "under_confident": [r for r in reversed(by_gap) if r["gap"] < 0][:10],
    }


def describe_dataset(data: Cifar100) -> dict:
    """What the dataset itself looks like; the same for every model."""
    test = data.test
    # The official training file is our train split plus the held-out validation images.
    train_images = np.concatenate([data.train.images, data.val.images])
    train_fine = np.concatenate([data.train.fine, data.val.fine])
    twins = findings.find_duplicates(test.images, train_images, NEAR_DUPLICATE_MAX_RMS)
    test_hashes, train_hashes = dhash(test.images), dhash(train_images)
    old = sum(
        bool((np.bitwise_count(train_hashes ^ h) <= OLD_HASH_BITS).any()) for h in test_hashes
    )
    labelled = [
        {
            **pair,
            "test_label": data.class_names[test.fine[pair["test"]]],
            "train_label": data.class_names[train_fine[pair["train"]]],
        }
        for pair in twins["exact"] + twins["near"]
    ]
    return {
        "train_images_per_class": np.bincount(train_fine, minlength=100).tolist(),
        "test_images_per_class": np.bincount(test.fine, minlength=100).tolist(),
        "mean_colour_per_class": [
            [round(float(v), 1) for v in test.images[test.fine == c].mean(axis=(0, 1, 2))]
            for c in range(100)
        ],
        "test_with_exact_duplicate_in_train": len(twins["exact"]),
        "test_with_near_duplicate_in_train": len(twins["near"]),
        "near_duplicate_max_rms": NEAR_DUPLICATE_MAX_RMS,
        "pixel_max": 255,
        "duplicate_pairs": labelled,
        "duplicate_pairs_with_other_label": sum(
            p["test_label"] != p["train_label"] for p in labelled
        ),
        "old_hash_test_matches": int(old),
        "old_hash_max_bits": OLD_HASH_BITS,
    }


def dhash(images: np.ndarray) -> np.ndarray:
    """64-bit difference hashes (the former near-duplicate test, kept to show how far off it
    was): is each pixel of a 9x8 grey thumbnail brighter than the next?"""
    hashes = np.empty(len(images), dtype=np.uint64)
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    for i, image in enumerate(images):
        small = np.asarray(Image.fromarray(image).convert("L").resize((9, 8), Image.Resampling.BOX))
        bits = (small[:, 1:] > small[:, :-1]).ravel()
        hashes[i] = np.sum(weights[bits])
    return hashes


def compare(scored: list[tuple[str, int, np.ndarray]], data: Cifar100) -> dict:
    """Every pair of models, smaller first, on the same test images."""
    names, labels = data.class_names, data.test.fine
    scored = sorted(scored, key=lambda item: (item[1], item[0]))
    pairs = []
    for (small_id, _, small), (large_id, _, large) in combinations(scored, 2):
        c = findings.compare_predictions(labels, small, large, 100)
        gain = np.asarray(c["per_class_gain"])
        order = np.lexsort((np.arange(100), -gain))  # biggest gain first, ties by class index
        rows = [
            {
                "class": names[i],
                "small": c["per_class_small"][i],
                "large": c["per_class_large"][i],
                "gain": float(gain[i]),
            }
            for i in order
        ]
        pair = {
            "small": small_id,
            "large": large_id,
            **{k: v for k, v in c.items() if not k.startswith("per_class")},
            "small_top1_accuracy": float((small == labels).mean()),
            "large_top1_accuracy": float((large == labels).mean()),
            "per_class": rows,
            "most_gained": rows[:10],
            "least_gained": rows[::-1][:10],
        }
        pair["findings"] = capacity_sentences(pair)
        pairs.append(pair)
    return {
        "models": [{"model_id": m, "parameter_count": p} for m, p, _ in scored],
        "images": len(labels),
        "classes": 100,
        "pairs": pairs,
    }


# --- sentences: every finding is derived from the numbers --------------------------------


def pct(value: float) -> str:
    return f"{value:.1%}"


def sentences(report: dict) -> dict:
    d, u = report["uncertainty"], report["calibration"]
    return {
        "mean_per_class": say_mean_per_class(
            report["mean_per_class_accuracy"],
            report["top1_accuracy"],
            report["test_images_per_class_equal"],
        ),
        "within_superclass": say_within(report["errors_within_superclass"], SIGNIFICANCE),
        "taxonomy_features": say_recovery(report["taxonomy"]["features"], "penultimate features"),
        "taxonomy_confusion": say_recovery(report["taxonomy"]["confusion"], "confusions"),
        "calibration": say_calibration(u["mean_confidence"], u["accuracy"]),
        "uncertainty": say_uncertainty(
            d["mean_entropy_bits_correct"], d["mean_entropy_bits_wrong"]
        ),
    }


def say_mean_per_class(mean: float, top1: float, equal_counts: bool) -> str:
    if equal_counts:
        return (
            f"Their mean, {pct(mean)}, is the top-1 accuracy ({pct(top1)}): every class has "
            "the same number of test images here, so each image weighs the same in both."
        )
    return (
        f"Their mean is {pct(mean)}, not the top-1 accuracy ({pct(top1)}): classes have "
        "different numbers of test images, and top-1 weighs each image, not each class, "
        "the same."
    )


def say_within(w: dict, level: float) -> str:
    if not w["errors"]:
        return "The model makes no errors on these images, so there is nothing to group."
    head = (
        f"Of the {w['errors']} errors, {pct(w['share'])} stay inside the true superclass, "
        f"where chance would put {pct(w['chance'])}"
    )
    if w["p_value"] >= level:
        return (
            f"{head}: {w['ratio_to_chance']:.1f} times chance, which a binomial test cannot "
            f"tell from chance (p = {w['p_value']:.2f}, level {level}). These errors show no "
            "sign of being between similar things."
        )
    if w["share"] < w["chance"]:
        return (
            f"{head}: fewer than chance (binomial test p < {level}). The model's errors "
            "avoid the true superclass."
        )
    most = (
        "Most errors are between classes of the same superclass."
        if w["share"] > 0.5
        else "Mistakes lean towards similar things, though most still cross superclasses."
    )
    return (
        f"{head}: {w['ratio_to_chance']:.1f} times what chance would give "
        f"(binomial test p < {level}). {most}"
    )


def say_recovery(r: dict, source: str) -> str:
    ari, share, chance = (
        r["adjusted_rand_index"],
        r["nearest_same_superclass_share"],
        r["nearest_same_superclass_chance"],
    )
    if ari >= 0.5:
        verdict = "largely recovers"
    elif ari >= 0.1:
        verdict = "partly recovers"
    else:
        verdict = "does not recover"
    if share > chance:
        neighbours = (
            f"{r['nearest_ratio_to_chance']:.1f} times the {pct(chance)} a random choice would give"
        )
    else:
        neighbours = f"no more than the {pct(chance)} a random choice would give"
    return (
        f"Grouped by their {source}, the classes cut into {r['clusters']} clusters give an "
        f"adjusted Rand index of {ari:.2f} against the {r['requested_clusters']} official "
        f"superclasses (1: the same grouping, 0: no better than random): the model {verdict} "
        f"the human taxonomy. Of each class's {r['nearest_k']} nearest classes, "
        f"{pct(share)} share its superclass, {neighbours}."
    )


def say_calibration(confidence: float, accuracy: float) -> str:
    if confidence > accuracy:
        return (
            f"Over-confident overall: mean confidence {pct(confidence)} against "
            f"{pct(accuracy)} accuracy."
        )
    if confidence < accuracy:
        return (
            f"Under-confident overall: mean confidence {pct(confidence)} against "
            f"{pct(accuracy)} accuracy."
        )
    return f"Mean confidence equals accuracy ({pct(accuracy)})."


def say_uncertainty(correct: float | None, wrong: float | None) -> str:
    if correct is None or wrong is None:
        return "The model is right on every image, or on none: no comparison to make."
    if wrong > correct:
        return (
            f"The model is less sure where it is wrong: mean entropy {wrong:.2f} bits on its "
            f"errors against {correct:.2f} bits where it is right, so its uncertainty is a "
            "usable warning."
        )
    return (
        f"The model is no less sure where it is wrong: mean entropy {wrong:.2f} bits on its "
        f"errors against {correct:.2f} bits where it is right, so its uncertainty does not "
        "warn of errors."
    )


def say_duplicates(d: dict) -> str:
    exact, near = d["test_with_exact_duplicate_in_train"], d["test_with_near_duplicate_in_train"]
    if exact + near == 0:
        found = "No test image has an exact or near twin in the training set."
    else:
        found = (
            f"{exact + near} test images have a twin in the training set: the model may have "
            "seen the answer, which inflates test scores."
        )
    return (
        f"{found} The former 64-bit difference-hash test (within {d['old_hash_max_bits']} "
        f"bits) would have flagged {d['old_hash_test_matches']}."
    )


def capacity_sentences(p: dict) -> dict:
    small, large = p["small"], p["large"]
    if p["classes_better"] > p["classes_worse"]:
        classes = (
            f"{large} is better than {small} on {p['classes_better']} classes and worse on "
            f"{p['classes_worse']} ({p['classes_equal']} equal)."
        )
    else:
        classes = (
            f"{large} is not better than {small} on most classes: better on "
            f"{p['classes_better']}, worse on {p['classes_worse']}, equal on "
            f"{p['classes_equal']}."
        )
    agreement = f"The two give the same answer on {pct(p['agreement'])} of the images."
    if p["large_errors_subset_of_small"]:
        subset = (
            f"Every error of {large} is also an error of {small}: the larger model only "
            "fixes mistakes, it adds none."
        )
    else:
        share = p["share_of_large_errors_also_small_errors"]
        subset = (
            f"The errors of {large} are not a subset of those of {small}: "
            f"{p['only_small_right']} images are right for {small} and wrong for {large}"
            + (f"; {pct(share)} of {large}'s errors are shared." if share is not None else ".")
        )
    if p["small_errors_subset_of_large"]:
        reverse = f"Every error of {small} is also an error of {large}."
    else:
        reverse = (
            f"The errors of {small} are not a subset of those of {large}: {large} fixes "
            f"{p['only_large_right']} of them."
        )
    both, independent = p["both_wrong"], p["both_wrong_if_independent"]
    if both > independent:
        joint = (
            f"Both are wrong on {both} images, more than the {independent:.1f} independent "
            "errors would give: the same images are hard for both."
        )
    else:
        joint = (
            f"Both are wrong on {both} images, no more than the {independent:.1f} independent "
            "errors would give."
        )
    return {
        "classes": classes,
        "agreement": agreement,
        "large_subset": subset,
        "small_subset": reverse,
        "joint": joint,
    }


# --- pictures --------------------------------------------------------------------------


def colours(count: int) -> list:
    cmap = plt.get_cmap("tab20")
    return [cmap(i % 20) for i in range(count)]


def feature_maps(features: np.ndarray) -> dict:
    """Penultimate features in two dimensions: PCA (linear) and t-SNE (neighbourhoods)."""
    centred = features - features.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2 / max(float((singular**2).sum()), 1e-12)
    sample, tsne = tsne_map(features)
    return {
        "pca": centred @ components[:2].T,
        "sample": sample,
        "tsne": tsne,
        "numbers": {
            "features": int(features.shape[1]),
            "pca_explained_variance": [float(v) for v in variance[:2]],
            "tsne_points": len(sample),
            "tsne_perplexity": tsne_perplexity(len(sample)),
        },
    }


def tsne_perplexity(points: int) -> float:
    return min(30.0, (points - 1) / 3)


def draw(report: dict, probabilities: np.ndarray, maps: dict, data: Cifar100, out: Path):
    names, supernames = data.class_names, data.superclass_names
    to_coarse = np.asarray(data.fine_to_coarse)
    test = data.test
    predicted = probabilities.argmax(axis=1)
    palette = colours(len(supernames))

    fig, ax = plt.subplots(figsize=(14, 4))
    accuracies = list(report["per_class_accuracy"].values())
    ax.bar(range(100), accuracies, color="#4c72b0")
    ax.axhline(report["top1_accuracy"], color="black", lw=1, ls="--", label="top-1")
    ax.set(xlabel="classes, best to worst", ylabel="accuracy", xlim=(-1, 100), ylim=(0, 1))
    ax.set_xticks(range(100), list(report["per_class_accuracy"]), rotation=90, fontsize=6)
    ax.legend()
    save(fig, out / "per_class.png")

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

    for source, title in (("features", "mean penultimate features"), ("confusion", "confusions")):
        result = report["taxonomy"][source]
        fig, ax = plt.subplots(figsize=(16, 5))
        dendrogram(np.asarray(result["linkage"]), names, to_coarse, palette, ax)
        ax.set_title(
            f"Classes clustered by their {title} (average linkage); "
            "labels coloured by official superclass",
            fontsize=10,
        )
        legend(ax, supernames, palette, loc="upper left", bbox_to_anchor=(1, 1))
        save(fig, out / f"dendrogram_{source}.png")

    bins = report["calibration"]["bins"]
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

    rows = report["class_calibration"]["per_class"]
    fig, ax = plt.subplots(figsize=(7, 7))
    index = {name: i for i, name in enumerate(names)}
    ax.scatter(
        [r["confidence"] for r in rows],
        [r["accuracy"] for r in rows],
        s=14,
        c=[palette[to_coarse[index[r["class"]]]] for r in rows],
    )
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    shown = report["class_calibration"]["over_confident"][:5]
    shown += report["class_calibration"]["under_confident"][:5]
    for r in shown:
        ax.annotate(
            r["class"],
            (r["confidence"], r["accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set(
        xlabel="mean confidence on the class's test images",
        ylabel="class accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title="below the line: over-confident",
    )
    save(fig, out / "class_calibration.png")

    # Penultimate features: PCA (linear) beside t-SNE (neighbourhoods), same colours.
    pca, sample, tsne = maps["pca"], maps["sample"], maps["tsne"]
    fig, axes = plt.subplots(1, 2, figsize=(16, 7.5))
    for ax, points, members_of, title in (
        (axes[0], pca, np.arange(len(pca)), "PCA: the first two principal components"),
        (axes[1], tsne, sample, f"t-SNE of {len(sample)} test images"),
    ):
        for s, name in enumerate(supernames):
            members = test.coarse[members_of] == s
            ax.scatter(*points[members].T, s=3, color=palette[s], label=name, alpha=0.6)
        ax.set(title=title, xticks=[], yticks=[])
    axes[1].legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    save(fig, out / "features_map.png")

    mean_colours = np.asarray(report["dataset"]["mean_colour_per_class"], dtype=np.uint8)
    swatches = [
        (np.full((32, 32, 3), colour, dtype=np.uint8), name)
        for colour, name in zip(mean_colours, names, strict=True)
    ]
    save_image(tiles(swatches, columns=10, scale=2), out / "mean_colours.png")

    for group in ("best_classes", "worst_classes"):
        class_rows = [
            (
                f"{name}\n{pct(report['per_class_accuracy'][name])} right",
                test.images[test.fine == index[name]][:6],
            )
            for name in report[group]
        ]
        save_image(captioned_rows(class_rows), out / f"{group}.png")
    confused_rows = []
    for pair in report["most_confused_pairs"]:
        hits = (test.fine == index[pair["true"]]) & (predicted == index[pair["predicted"]])
        caption = f"{pair['true']}\n  taken for {pair['predicted']} ({pair['count']}x)"
        confused_rows.append((caption, test.images[hits][:6]))
    save_image(captioned_rows(confused_rows), out / "confused_pairs.png")

    candidates = [
        (
            test.images[c["index"]],
            f"#{c['index']}\ngiven: {c['given']}\nmodel: {c['suggested']}\n"
            f"p(given) {c['given_probability']:.2f}",
        )
        for c in report["label_issues"]["candidates"]
    ]
    save_image(tiles(candidates), out / "label_issues.png")
    unsure = [
        (
            test.images[u["index"]],
            f"#{u['index']}\ntrue: {u['true']}\nmodel: {u['predicted']}\n"
            f"{u['entropy_bits']:.2f} bits",
        )
        for u in report["uncertainty"]["most_uncertain"]
    ]
    save_image(tiles(unsure), out / "uncertain.png")
    twins = report["dataset"]["duplicate_pairs"][:10]
    train_images = np.concatenate([data.train.images, data.val.images])
    twin_rows = [
        (
            f"test #{p['test']} ({p['test_label']})\ntrain #{p['train']} ({p['train_label']})\n"
            + (f"RMS {p['rms']:.1f}" if "rms" in p else "exact"),
            np.stack([test.images[p["test"]], train_images[p["train"]]]),
        )
        for p in twins
    ]
    if twin_rows:
        save_image(captioned_rows(twin_rows, columns=2), out / "duplicates.png")


def tsne_map(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE of at most TSNE_POINTS rows (a fixed random sample), single-threaded so the
    result does not depend on how threads split the sums."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    sample = np.arange(len(features))
    if len(sample) > TSNE_POINTS:
        sample = np.sort(np.random.default_rng(SEED).permutation(len(features))[:TSNE_POINTS])
    x = features[sample].astype(np.float64)
    with threadpool_limits(1):
        tsne = TSNE(2, perplexity=tsne_perplexity(len(x)), init="pca", random_state=SEED)
        points = tsne.fit_transform(x)
    return sample, points


def dendrogram(tree: np.ndarray, names, to_coarse, palette, ax) -> None:
    from scipy.cluster.hierarchy import dendrogram as scipy_dendrogram

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


def font(size: int = 11) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def captioned_rows(rows: list[tuple[str, np.ndarray]], columns: int = 6, scale: int = 2):
    """One row per entry: its caption on the left, then up to `columns` images."""
    size, label = 32 * scale + 4, 170
    canvas = Image.new("RGB", (label + columns * size, max(len(rows), 1) * size), "white")
    pen = ImageDraw.Draw(canvas)
    for r, (caption, images) in enumerate(rows):
        pen.multiline_text((6, r * size + 8), caption, fill="black", font=font(), spacing=3)
        for c, image in enumerate(images[:columns]):
            big = Image.fromarray(image).resize((32 * scale, 32 * scale), Image.Resampling.NEAREST)
            canvas.paste(big, (label + c * size + 2, r * size + 2))
        if r:
            pen.line([(0, r * size), (canvas.width, r * size)], fill="#dddddd")
    return canvas


def tiles(items: list[tuple[np.ndarray, str]], columns: int = 5, scale: int = 3):
    """A grid of images, each with its caption underneath."""
    lines = max((caption.count("\n") + 1 for _, caption in items), default=1)
    width, height = max(32 * scale, 96) + 40, 32 * scale + 8 + 14 * lines
    rows = max((len(items) + columns - 1) // columns, 1)
    canvas = Image.new("RGB", (columns * width, rows * height), "white")
    pen = ImageDraw.Draw(canvas)
    for n, (image, caption) in enumerate(items):
        left, top = (n % columns) * width, (n // columns) * height
        big = Image.fromarray(image).resize((32 * scale, 32 * scale), Image.Resampling.NEAREST)
        canvas.paste(big, (left + 4, top + 4))
        pen.multiline_text(
            (left + 4, top + 32 * scale + 6), caption, fill="black", font=font(10), spacing=2
        )
    return canvas


def save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, **PNG)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def save_image(image: Image.Image | np.ndarray, path: Path) -> None:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    write_bytes(path, buffer.getvalue())


def draw_compare(comparison: dict, data: Cifar100, out: Path) -> None:
    to_coarse = np.asarray(data.fine_to_coarse)
    index = {name: i for i, name in enumerate(data.class_names)}
    palette = colours(20)
    for n, pair in enumerate(comparison["pairs"]):
        rows = pair["per_class"]
        fig, ax = plt.subplots(figsize=(7.5, 7.5))
        ax.scatter(
            [r["small"] for r in rows],
            [r["large"] for r in rows],
            s=14,
            c=[palette[to_coarse[index[r["class"]]]] for r in rows],
        )
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        for r in pair["most_gained"][:5] + pair["least_gained"][:5]:
            ax.annotate(
                r["class"],
                (r["small"], r["large"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
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


# --- the pages -------------------------------------------------------------------------

STYLE = """<style>
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 0 auto 2em; }
nav.top { border-bottom: 1px solid #ddd; padding: .6em 0; margin-bottom: 1em; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border-bottom: 1px solid #ddd; padding: 2px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; }
.cols { display: flex; gap: 3em; flex-wrap: wrap; }
.finding { background: #f4f6fa; border-left: 3px solid #4c72b0; padding: .4em .8em; }
</style>"""
HEADER = '<nav class="top"><a href="/">&larr; Home: all models</a></nav>'


def page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n{STYLE}</head><body>\n{HEADER}\n{body}\n"
        '<p>Every number on this page is in <a href="report.json">report.json</a>.</p>\n'
        "</body></html>\n"
    )


def table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render(report: dict) -> str:
    e = html.escape
    f, d = report["findings"], report["dataset"]
    top = [
        ("top-1 accuracy", pct(report["top1_accuracy"])),
        ("top-5 accuracy", pct(report["top5_accuracy"])),
        ("superclass of the top class: accuracy", pct(report["superclass_of_top_class_accuracy"])),
        ("summed superclass: accuracy", pct(report["summed_superclass_accuracy"])),
        ("original experiment (validation, 48 epochs)", pct(report["original_accuracy"])),
        (
            "expected calibration error",
            f"{report['calibration']['expected_calibration_error']:.4f}",
        ),
    ]
    headline = "".join(f'<tr><th>{k}</th><td class="num">{v}</td></tr>' for k, v in top)
    per_class = "".join(
        f'<tr><td>{e(name)}</td><td class="num">{pct(acc)}</td></tr>'
        for name, acc in report["per_class_accuracy"].items()
    )
    summed = report["per_superclass_summed_accuracy"]
    per_super = table(
        ["superclass", "of the top class", "summed"],
        [
            [e(k), pct(v), pct(summed[k])]
            for k, v in report["per_superclass_of_top_class_accuracy"].items()
        ],
        {1, 2},
    )
    pairs = table(
        ["#", "true", "predicted", "count", "same superclass"],
        [
            [
                str(i + 1),
                e(p["true"]),
                e(p["predicted"]),
                str(p["count"]),
                "yes" if p["same_superclass"] else "no",
            ]
            for i, p in enumerate(report["most_confused_pairs"])
        ],
        {0, 3},
    )
    cc = report["class_calibration"]

    def calibration_rows(rows):
        return table(
            ["class", "accuracy", "mean confidence", "gap"],
            [
                [e(r["class"]), pct(r["accuracy"]), pct(r["confidence"]), f"{r['gap']:+.3f}"]
                for r in rows
            ],
            {1, 2, 3},
        )

    issues = table(
        ["#", "test image", "given label", "model suggests", "p(given)", "p(suggested)"],
        [
            [
                str(n + 1),
                str(c["index"]),
                e(c["given"]),
                e(c["suggested"]),
                f"{c['given_probability']:.3f}",
                f"{c['suggested_probability']:.3f}",
            ]
            for n, c in enumerate(report["label_issues"]["candidates"])
        ],
        {0, 1, 4, 5},
    )
    uncertain = table(
        ["#", "test image", "true", "predicted", "probability", "entropy (bits)"],
        [
            [
                str(n + 1),
                str(u["index"]),
                e(u["true"]),
                e(u["predicted"]),
                f"{u['probability']:.3f}",
                f"{u['entropy_bits']:.2f}",
            ]
            for n, u in enumerate(report["uncertainty"]["most_uncertain"])
        ],
        {0, 1, 4, 5},
    )
    taxonomy = "".join(
        taxonomy_section(report["taxonomy"][s], s, f[f"taxonomy_{s}"])
        for s in ("features", "confusion")
    )
    maps = report["feature_maps"]
    variance = maps["pca_explained_variance"]
    twins = report["dataset"]["duplicate_pairs"]
    body = f"""<h1>{e(report["model_id"])}: what characterises a 100-class dataset</h1>
<p>{report["images"]} test images, scored by the exported ONNX model
({report["parameter_count"]} parameters).</p>
<table id="headline">{headline}</table>
<p>Two superclass accuracies, named apart: the <b>superclass of the top class</b> is right
when the most probable fine class is in the true superclass (what the evaluation in the
model card calls <code>superclass_of_top_class_accuracy</code>); the <b>summed superclass</b>
is the superclass with the highest summed fine probability, what the service returns
(<code>summed_superclass_accuracy</code>).</p>

<h2>Classes</h2>
<p>Per-class accuracy, best to worst.</p>
<p class="finding" id="mean-per-class">{e(f["mean_per_class"])}</p>
<img src="per_class.png" alt="per-class accuracy, best to worst">
<div class="cols">
<div><h3>10 best classes</h3><p>Each row: the class, its accuracy, 6 of its test images.</p>
<img src="best_classes.png" alt="10 best classes, one captioned row each"></div>
<div><h3>10 worst classes</h3><p>Each row: the class, its accuracy, 6 of its test images.</p>
<img src="worst_classes.png" alt="10 worst classes, one captioned row each"></div>
</div>
<h3>Superclasses</h3>
<img src="per_superclass.png" alt="per-superclass accuracy, both definitions">

<h2>Confusions</h2>
<p>The confusion matrix with classes grouped by superclass (log scale).</p>
<p class="finding" id="within">{e(f["within_superclass"])}</p>
<img src="confusion.png" alt="confusion matrix grouped by superclass">
<h3>The most confused pairs</h3>
{pairs}
<p>Each row: the true class, what it was taken for, up to 6 such test images.</p>
<img src="confused_pairs.png" alt="confused test images, one captioned row per pair">

<h2>Does the model see the human taxonomy?</h2>
<p>Two ways to group the {report["classes"]} classes from the model alone: by the cosine
distance between their mean penultimate features, and by how often the model confuses them
(the mean of the two confusion rates). Each tree is cut into {CLUSTERS} clusters and
compared with the {report["superclasses"]} official superclasses.</p>
{taxonomy}

<h2>Which labels look wrong?</h2>
<p>Confident learning (cleanlab's <code>find_label_issues</code>, ranked by the probability
the model gives the label) flags <b id="label-issues">{report["label_issues"]["count"]}</b>
test images whose label the model disagrees with. <b>These are candidates for a person to
look at, not verdicts</b>: a model that is confidently wrong lands here as well as a wrong
label. The first {len(report["label_issues"]["candidates"])}:</p>
{issues}
<img src="label_issues.png" alt="label issue candidates, captioned">

<h2>Where is the model unsure?</h2>
<p class="finding" id="calibration">{e(f["calibration"])} Expected calibration error
{report["calibration"]["expected_calibration_error"]:.4f} over
{len(report["calibration"]["bins"])} confidence bins.</p>
<div class="cols">
<img src="reliability.png" alt="reliability diagram">
<img src="class_calibration.png" alt="per-class mean confidence against accuracy">
</div>
<div class="cols">
<div><h3>Most over-confident classes</h3>{calibration_rows(cc["over_confident"])}</div>
<div><h3>Most under-confident classes</h3>{calibration_rows(cc["under_confident"])}</div>
</div>
<p class="finding" id="uncertainty">{e(f["uncertainty"])}</p>
<h3>The test images with the highest entropy</h3>
<p>Entropy of the predicted distribution, in bits ({report["uncertainty"]["max_entropy_bits"]:.2f}
for a uniform guess over the classes).</p>
{uncertain}
<img src="uncertain.png" alt="highest-entropy test images, captioned">

<h2>Features</h2>
<p>The penultimate layer's {maps["features"]} activations of each test image: on the left
their first two principal components ({pct(variance[0])} and {pct(variance[1])} of the
variance), on the right t-SNE (scikit-learn, fixed seed) of {maps["tsne_points"]} of them,
both coloured by superclass. t-SNE keeps neighbourhoods, not distances.</p>
<img src="features_map.png" alt="PCA and t-SNE of penultimate features, coloured by superclass">

<h2>The dataset</h2>
<p>Training images per class: {min(d["train_images_per_class"])} to
{max(d["train_images_per_class"])}; test images per class: {min(d["test_images_per_class"])}
to {max(d["test_images_per_class"])}.</p>
<p>Test images with an exact duplicate (identical pixels) in the training set:
<b id="exact">{d["test_with_exact_duplicate_in_train"]}</b>; with a near duplicate (not
exact; root mean square pixel difference at most {d["near_duplicate_max_rms"]:.1f} of
{d["pixel_max"]}):
<b id="near">{d["test_with_near_duplicate_in_train"]}</b>; of these pairs,
{d["duplicate_pairs_with_other_label"]} carry different labels. Shifted, cropped or flipped
copies are not looked for.</p>
<p class="finding" id="duplicates">{e(say_duplicates(d))}</p>
{
        "<p>Each row: a test image and its training twin (the first "
        + str(len(twins[:10]))
        + ').</p><img src="duplicates.png" alt="duplicate pairs, captioned">'
        if twins
        else ""
    }
<p>Mean colour of each class's test images, captioned with the class:</p>
<img src="mean_colours.png" alt="mean colour per class, captioned">

<div class="cols">
<div><h3>Per-class accuracy</h3><table>{per_class}</table></div>
<div><h3>Per-superclass accuracy</h3>{per_super}</div>
</div>"""
    return page(f"{report['model_id']}: what characterises CIFAR-100", body)


def taxonomy_section(r: dict, source: str, finding: str) -> str:
    e = html.escape
    title = {"features": "By mean penultimate features", "confusion": "By confusions"}[source]
    split = table(
        ["superclass", "split into"],
        [
            [e(s["superclass"]), " | ".join(", ".join(map(e, part)) for part in s["parts"])]
            for s in r["split_superclasses"]
        ],
    )
    merged = table(
        ["class", "superclass", "class", "superclass", "distance", "same cluster"],
        [
            [
                e(p["a"]),
                e(p["superclass_a"]),
                e(p["b"]),
                e(p["superclass_b"]),
                f"{p['distance']:.3f}",
                "yes" if p["same_cluster"] else "no",
            ]
            for p in r["closest_cross_superclass_pairs"]
        ],
        {4},
    )
    return f"""<h3>{title}</h3>
<p class="finding" id="taxonomy-{source}">{e(finding)}</p>
<img src="dendrogram_{source}.png" alt="classes clustered by {source}">
<p>{len(r["split_superclasses"])} superclasses are split across clusters:</p>
{split}
<p>The closest pairs of classes from different superclasses (what the model merges):</p>
{merged}"""


def render_compare(comparison: dict) -> str:
    e = html.escape
    models = table(
        ["model", "parameters"],
        [
            [
                f'<a href="/models/{e(m["model_id"])}/report">{e(m["model_id"])}</a>',
                str(m["parameter_count"]),
            ]
            for m in comparison["models"]
        ],
        {1},
    )
    sections = []
    for n, p in enumerate(comparison["pairs"]):
        s, lg = e(p["small"]), e(p["large"])
        f = p["findings"]
        outcome = table(
            ["", f"{lg} right", f"{lg} wrong"],
            [
                [f"{s} right", str(p["both_right"]), str(p["only_small_right"])],
                [f"{s} wrong", str(p["only_large_right"]), str(p["both_wrong"])],
            ],
            {1, 2},
        )

        def gains(rows, p=p):
            return table(
                ["class", p["small"], p["large"], "gain"],
                [
                    [e(r["class"]), pct(r["small"]), pct(r["large"]), f"{r['gain']:+.1%}"]
                    for r in rows
                ],
                {1, 2, 3},
            )

        sections.append(f"""<h2>{s} against {lg}</h2>
<p>Top-1 accuracy: {s} {pct(p["small_top1_accuracy"])}, {lg} {pct(p["large_top1_accuracy"])}
on the same {p["images"]} test images.</p>
<p class="finding" id="classes-{n}">{e(f["classes"])}</p>
<img src="per_class_{n}.png" alt="per-class accuracy of {s} against {lg}, outliers labelled">
<div class="cols">
<div><h3>Where {lg} gains most</h3>{gains(p["most_gained"])}</div>
<div><h3>Where {lg} gains least</h3>{gains(p["least_gained"])}</div>
</div>
<h3>Agreement and errors</h3>
<p class="finding" id="agreement-{n}">{e(f["agreement"])}</p>
{outcome}
<p class="finding" id="large-subset-{n}">{e(f["large_subset"])}</p>
<p class="finding" id="small-subset-{n}">{e(f["small_subset"])}</p>
<p class="finding" id="joint-{n}">{e(f["joint"])}</p>""")
    body = (
        "<h1>What capacity buys: the exported models side by side</h1>\n"
        f"<p>Every exported model on the same {comparison['images']} test images.</p>\n"
        + models
        + "\n"
        + "\n".join(sections)
    )
    return page("CIFAR-100: the models compared", body)
