"""The numbers of a report: the measures run over one model's scores, with classes named.

analyse() gives one model's report (every number its page shows; write.py adds the
familiarity and explanation sections and the sentences); familiarity() measures how its
familiarity output tells known images from others; compare() gives the side-by-side
numbers of every pair of models. All return plain dicts that go to report.json as they are.
"""

from itertools import combinations

import numpy as np
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from training.data import Cifar100
from training.evaluate import compute_metrics
from training.models import ORIGINAL_ACCURACY
from training.report import measures
from training.report.sentences import capacity_sentences

CALIBRATION_BINS = 15
CLUSTERS = 20  # cut of the learned class tree, as many groups as official superclasses
NEAREST_K = 4  # each class's nearest classes; a superclass has 4 other classes
SIGNIFICANCE = 0.01  # binomial test level for "more (or less) than chance"
SHOWN = 20  # label-issue candidates and uncertain images shown
TSNE_POINTS = 3000  # t-SNE runs on at most this many test images (a fixed sample)
RECALL = 0.95  # false positive rates are read where this share of known images is accepted
UNFAMILIAR_LEVEL = 0.05  # familiarity below it: stranger than 95 % of validation images
TAKEN_FOR = 3  # the classes other images are most often given
SEED = 0


def analyse(
    model_id: str,
    parameters: int,
    probabilities: np.ndarray,
    features: np.ndarray,
    data: Cifar100,
    dataset: dict,
    test_index: np.ndarray | None = None,
    held_out: list[str] | None = None,
) -> dict:
    """One model's numbers from its probabilities and penultimate features on data.test, with
    `dataset` (dataset.describe_dataset's, the same for every model). The familiarity and
    explanation sections are added by write.py, then the findings (sentences.sentences).

    A model that held classes out of training is analysed on the known classes' test images
    only: `data.test` holds those, `test_index` says where each sits in the test file (the
    image numbers the report shows), `held_out` names the classes left out."""
    test, names, supernames = data.test, data.class_names, data.superclass_names
    test_index = np.arange(len(test)) if test_index is None else np.asarray(test_index)
    held_out = list(held_out or [])
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

    # Classes without a test image here (held out of training) have no accuracy to rank.
    scored = [(name, acc) for name, acc in metrics["per_class_accuracy"].items() if acc is not None]
    per_class = sorted(scored, key=lambda kv: (-kv[1], kv[0]))
    counts = np.bincount(test.fine, minlength=100)[[names.index(name) for name, _ in per_class]]
    mean_per_class = float(np.mean([acc for _, acc in per_class]))
    within = measures.within_superclass(test.fine, predicted, to_coarse)

    entropy = measures.entropy_bits(probabilities)
    correct = predicted == test.fine
    uncertain = measures.most_uncertain(probabilities, SHOWN)
    issues = measures.label_issues(test.fine, probabilities, SHOWN)
    for candidate in issues["candidates"]:
        candidate["index"] = int(test_index[candidate["index"]])
        candidate["given"] = names[candidate["given"]]
        candidate["suggested"] = names[candidate["suggested"]]

    report = {
        "model_id": model_id,
        "parameter_count": parameters,
        "images": len(test),
        "held_out_classes": held_out,
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
                    "index": int(test_index[i]),
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
                measures.cosine_distances(measures.class_means(features, test.fine, 100)), data
            ),
            "confusion": recovery(measures.confusion_distances(confusion), data),
        },
        "dataset": dataset,
    }
    return report


def familiarity(known: dict[str, np.ndarray], others: list[dict], names: list[str]) -> dict:
    """How well the model's familiarity output tells the known classes' test images from
    other images, against the simplest alternative, the top probability.

    `known` and each of `others` hold arrays over their images: "familiarity" ([N] or
    [N, 1]), "probabilities" [N, classes], and for held-out test images "labels"; each
    of `others` also says its "name", "kind", "source" and "skipped" (files not read).
    Known images are the positives: AUROC is the chance a known image is more familiar
    than another image, and the false positive rate is the share of other images still
    accepted at the threshold that accepts RECALL of the known ones."""
    known_familiarity = np.ravel(known["familiarity"])
    known_top = known["probabilities"].max(axis=1)
    cut = measures.false_positives_at_recall(known_familiarity, known_familiarity, RECALL)
    top_cut = measures.false_positives_at_recall(known_top, known_top, RECALL)
    sets = []
    for other in others:
        values, probabilities = np.ravel(other["familiarity"]), other["probabilities"]
        entry = {
            "name": other["name"],
            "kind": other["kind"],
            "source": other["source"],
            "skipped": other["skipped"],
            **separation(known_familiarity, known_top, values, probabilities, names),
        }
        if "labels" in other:  # held-out test images: each class on its own as well
            entry["per_class"] = [
                {
                    "class": names[label],
                    **separation(
                        known_familiarity,
                        known_top,
                        values[other["labels"] == label],
                        probabilities[other["labels"] == label],
                        names,
                    ),
                }
                for label in np.unique(other["labels"])
            ]
        sets.append(entry)
    return {
        "available": True,
        "recall": RECALL,
        "level": UNFAMILIAR_LEVEL,
        "known": {
            "images": len(known_familiarity),
            "median_familiarity": float(np.median(known_familiarity)),
            "share_below_level": float((known_familiarity < UNFAMILIAR_LEVEL).mean()),
        },
        "threshold": cut["threshold"],
        "threshold_recall": cut["recall"],
        "top_probability_threshold": top_cut["threshold"],
        "sets": sets,
    }


def separation(
    known: np.ndarray,
    known_top: np.ndarray,
    values: np.ndarray,
    probabilities: np.ndarray,
    names: list[str],
) -> dict:
    """One set of other images against the known ones: by familiarity and by top
    probability, and the classes the model gives them most often."""
    top = probabilities.max(axis=1)
    by_familiarity = measures.false_positives_at_recall(known, values, RECALL)
    by_top = measures.false_positives_at_recall(known_top, top, RECALL)
    predicted = np.bincount(probabilities.argmax(axis=1), minlength=len(names))
    taken_for = np.argsort(-predicted, kind="stable")[:TAKEN_FOR]
    return {
        "images": len(values),
        "median_familiarity": float(np.median(values)),
        "share_below_level": float((values < UNFAMILIAR_LEVEL).mean()),
        "auroc": measures.auroc(known, values),
        "false_positive_rate": by_familiarity["false_positive_rate"],
        "top_probability_auroc": measures.auroc(known_top, top),
        "top_probability_false_positive_rate": by_top["false_positive_rate"],
        "mean_top_probability": float(top.mean()),
        "taken_for": [
            {"class": names[c], "share": float(predicted[c] / len(values))}
            for c in taken_for
            if predicted[c]
        ],
    }


def recovery(distances: np.ndarray, data: Cifar100) -> dict:
    """measures.superclass_recovery with class and superclass names instead of indices."""
    names, supernames = data.class_names, data.superclass_names
    result = measures.superclass_recovery(
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
    per = measures.per_class_calibration(probabilities, labels, len(names))
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


def compare(scored: list[tuple[str, int, np.ndarray]], data: Cifar100) -> dict:
    """Every pair of models, smaller first, on the same test images (those of the classes
    every model was trained on: `data.test` holds only those)."""
    names, labels = data.class_names, data.test.fine
    present = np.bincount(labels, minlength=100) > 0
    scored = sorted(scored, key=lambda item: (item[1], item[0]))
    pairs = []
    for (small_id, _, small), (large_id, _, large) in combinations(scored, 2):
        c = measures.compare_predictions(labels, small, large, 100)
        gain = np.asarray(c["per_class_gain"])
        order = np.lexsort((np.arange(100), -gain))  # biggest gain first, ties by class index
        order = order[present[order]]  # a class without test images here has no accuracy
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
        "classes": int(present.sum()),
        "pairs": pairs,
    }


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


def tsne_map(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE of at most TSNE_POINTS rows (a fixed random sample), single-threaded so the
    result does not depend on how threads split the sums."""
    sample = np.arange(len(features))
    if len(sample) > TSNE_POINTS:
        sample = np.sort(np.random.default_rng(SEED).permutation(len(features))[:TSNE_POINTS])
    x = features[sample].astype(np.float64)
    with threadpool_limits(1):
        tsne = TSNE(2, perplexity=tsne_perplexity(len(x)), init="pca", random_state=SEED)
        points = tsne.fit_transform(x)
    return sample, points
