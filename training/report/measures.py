"""The measures: pure functions on NumPy arrays that return plain numbers, no names, no files.

Each takes labels (class indices), predictions, probabilities, features or pixels and returns
numbers, lists and dicts small enough to check against a case worked out by hand
(tests/test_report.py does). analysis.py runs them on a model's scores and names the classes.
"""

import numpy as np
from PIL import Image
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from scipy.stats import binomtest, rankdata
from sklearn.metrics import adjusted_rand_score

# --- errors and the taxonomy ----------------------------------------------------------


def within_superclass(true: np.ndarray, predicted: np.ndarray, to_coarse: np.ndarray) -> dict:
    """Of the errors, the share whose prediction shares the true class's superclass.

    Chance: an error that picked one of the other classes uniformly would land in the
    true superclass with probability (size of the superclass - 1) / (classes - 1), 4/99 for
    CIFAR-100. The binomial test asks whether the observed share could be that chance.
    """
    to_coarse = np.asarray(to_coarse)
    classes = len(to_coarse)
    sizes = np.bincount(to_coarse, minlength=to_coarse.max() + 1)
    per_class_chance = (sizes[to_coarse] - 1) / (classes - 1)
    errors = predicted != true
    count = int(errors.sum())
    within = int((to_coarse[predicted[errors]] == to_coarse[true[errors]]).sum())
    # Chance over the errors actually made (each error's true class has its own chance).
    chance = (
        float(per_class_chance[true[errors]].mean()) if count else float(per_class_chance.mean())
    )
    share = within / count if count else None
    p_value = float(binomtest(within, count, chance).pvalue) if count else None
    return {
        "errors": count,
        "within": within,
        "share": share,
        "chance": chance,
        "ratio_to_chance": share / chance if count else None,
        "p_value": p_value,
    }


def class_means(features: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Mean feature vector of each class (zeros for a class without images)."""
    sums = np.zeros((classes, features.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, features)
    counts = np.bincount(labels, minlength=classes)[:, None]
    return sums / np.maximum(counts, 1)


def cosine_distances(vectors: np.ndarray) -> np.ndarray:
    """1 - cosine similarity between rows; a zero row is at distance 1 from everything."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.divide(vectors, norms, out=np.zeros_like(vectors, dtype=np.float64), where=norms > 0)
    distances = 1 - unit @ unit.T
    np.fill_diagonal(distances, 0)
    return np.clip(distances, 0, 2)


def confusion_distances(confusion: np.ndarray) -> np.ndarray:
    """Classes are close when the model confuses them, in either direction.

    Similarity is the mean of the two confusion rates (errors over the true class's images);
    distance is 1 - similarity, 1 for classes never confused with each other.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    similarity = (rates + rates.T) / 2
    distances = 1 - similarity
    np.fill_diagonal(distances, 0)
    return distances


def cluster(distances: np.ndarray, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Average-linkage hierarchical clustering; the tree and its cut into `clusters` groups
    (cluster numbers from 1; fewer groups when ties leave no cut with exactly that many)."""
    tree = linkage(squareform(distances, checks=False), method="average")
    return tree, fcluster(tree, clusters, criterion="maxclust")


def nearest_share(distances: np.ndarray, to_coarse: np.ndarray, k: int) -> np.ndarray:
    """Per class: the share of its k nearest other classes that are in its superclass.

    Ties in distance are broken by class index, so the answer is deterministic."""
    to_coarse = np.asarray(to_coarse)
    masked = distances.astype(np.float64).copy()
    np.fill_diagonal(masked, np.inf)
    nearest = np.argsort(masked, axis=1, kind="stable")[:, :k]
    return (to_coarse[nearest] == to_coarse[:, None]).mean(axis=1)


def split_superclasses(groups: np.ndarray, to_coarse: np.ndarray) -> list[dict]:
    """Superclasses whose classes the learned grouping spreads over several groups:
    [{"superclass": s, "parts": [[classes], ...]}], most parts first."""
    to_coarse = np.asarray(to_coarse)
    split = []
    for s in np.unique(to_coarse):
        members = np.flatnonzero(to_coarse == s)
        parts = [members[groups[members] == g].tolist() for g in np.unique(groups[members])]
        if len(parts) > 1:
            parts.sort(key=lambda part: (-len(part), part[0]))
            split.append({"superclass": int(s), "parts": parts})
    split.sort(key=lambda item: (-len(item["parts"]), item["superclass"]))
    return split


def closest_cross_pairs(distances: np.ndarray, to_coarse: np.ndarray, n: int) -> list[dict]:
    """The n closest pairs of classes from different superclasses: what the model merges."""
    to_coarse = np.asarray(to_coarse)
    i, j = np.triu_indices(len(to_coarse), k=1)
    cross = to_coarse[i] != to_coarse[j]
    i, j = i[cross], j[cross]
    order = np.lexsort((j, i, distances[i, j]))[:n]
    return [
        {"a": int(i[o]), "b": int(j[o]), "distance": float(distances[i[o], j[o]])} for o in order
    ]


def superclass_recovery(
    distances: np.ndarray, to_coarse: np.ndarray, clusters: int = 20, k: int = 4, pairs: int = 10
) -> dict:
    """How well a learned distance between classes recovers the official superclasses.

    ARI: adjusted Rand index between the official superclasses and the tree cut into
    `clusters` groups (1 = the same partition, about 0 = no better than a random one).
    Nearest share: the mean share of each class's k nearest classes in its superclass,
    against what a random choice of k other classes would give."""
    to_coarse = np.asarray(to_coarse)
    tree, groups = cluster(distances, clusters)
    shares = nearest_share(distances, to_coarse, k)
    sizes = np.bincount(to_coarse)
    chance = float(((sizes[to_coarse] - 1) / (len(to_coarse) - 1)).mean())
    return {
        "clusters": len(np.unique(groups)),
        "adjusted_rand_index": float(adjusted_rand_score(to_coarse, groups)),
        "groups": groups.tolist(),
        "nearest_k": k,
        "nearest_same_superclass_share": float(shares.mean()),
        "nearest_same_superclass_share_per_class": shares.tolist(),
        "nearest_same_superclass_chance": chance,
        "nearest_ratio_to_chance": float(shares.mean()) / chance,
        "split_superclasses": split_superclasses(groups, to_coarse),
        "closest_cross_superclass_pairs": closest_cross_pairs(distances, to_coarse, pairs),
        "linkage": tree.tolist(),
    }


# --- confidence ------------------------------------------------------------------------


def entropy_bits(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy of each row, in bits (0: certain; log2(100) = 6.64: uniform)."""
    p = np.asarray(probabilities, dtype=np.float64)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=1) + 0.0  # + 0.0: no negative zero


def most_uncertain(probabilities: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest-entropy rows, highest first, ties by index."""
    entropy = entropy_bits(probabilities)
    return np.lexsort((np.arange(len(entropy)), -entropy))[:n]


def per_class_calibration(probabilities: np.ndarray, labels: np.ndarray, classes: int) -> dict:
    """Per true class: accuracy, mean top-1 confidence and their gap (confidence minus
    accuracy: above 0 the model is over-confident on that class's images)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    counts = np.bincount(labels, minlength=classes)
    safe = np.maximum(counts, 1)
    accuracy = np.bincount(labels, weights=correct, minlength=classes) / safe
    mean_confidence = np.bincount(labels, weights=confidence, minlength=classes) / safe
    return {
        "images": counts.tolist(),
        "accuracy": accuracy.tolist(),
        "confidence": mean_confidence.tolist(),
        "gap": (mean_confidence - accuracy).tolist(),
    }


# --- known images against others --------------------------------------------------------


def auroc(known: np.ndarray, other: np.ndarray) -> float:
    """Area under the ROC curve of a score meant to be higher on known images than on
    others: the chance that a known image drawn at random scores above another image drawn
    at random, ties counting half (the Mann-Whitney U over both counts). 1: every known
    image above every other; 0.5: a coin; 0: the score is upside down."""
    n, m = len(known), len(other)
    if not n or not m:
        raise ValueError("AUROC needs at least one image on each side")
    ranks = rankdata(np.concatenate([known, other]).astype(np.float64))  # ties: mean rank
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def false_positives_at_recall(known: np.ndarray, other: np.ndarray, recall: float) -> dict:
    """Accepting the images that score at least a threshold, the highest threshold that
    accepts `recall` of the known images (or more, on ties): that threshold, the share of
    known images it accepts, and the share of the others it accepts too (the false
    positive rate, where known is positive)."""
    if not len(known) or not len(other):
        raise ValueError("a false positive rate needs at least one image on each side")
    # Reject at most this many known images, the lowest ones. The tiny term: 1 - 0.9 is
    # 0.09999999999999998 in floating point, and 10 images must reject 1, not 0.
    rejected = int(np.floor(len(known) * (1 - recall) + 1e-9))
    threshold = float(np.sort(known)[rejected])
    return {
        "threshold": threshold,
        "recall": float((known >= threshold).mean()),
        "false_positive_rate": float((other >= threshold).mean()),
    }


# --- labels ----------------------------------------------------------------------------


def label_issues(labels: np.ndarray, probabilities: np.ndarray, n: int) -> dict:
    """Test images whose label the model disagrees with most (confident learning, cleanlab).

    The probabilities are out-of-sample (the model never trained on the test set), as
    cleanlab requires. Candidates come ranked by self-confidence: the probability the model
    gives the given label, lowest first. A confidently wrong model lands here too: these are
    candidates for a human to look at, not verdicts."""
    from cleanlab.filter import find_label_issues

    ranked = find_label_issues(
        labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    top = [int(i) for i in ranked[:n]]
    return {
        "count": len(ranked),
        "candidates": [
            {
                "index": i,
                "given": int(labels[i]),
                "suggested": int(probabilities[i].argmax()),
                "given_probability": float(probabilities[i, labels[i]]),
                "suggested_probability": float(probabilities[i].max()),
            }
            for i in top
        ],
    }


# --- duplicates ------------------------------------------------------------------------


def thumbnails(images: np.ndarray, block: int = 4) -> np.ndarray:
    """Box-averaged thumbnails (32x32 -> 8x8 by default), float32, flattened."""
    n, h, w, c = images.shape
    small = images.reshape(n, h // block, block, w // block, block, c).mean(axis=(2, 4))
    return small.reshape(n, -1).astype(np.float32)


def find_duplicates(test: np.ndarray, train: np.ndarray, max_rms: float, chunk: int = 256) -> dict:
    """Test images with an exact twin in train, and with a near one (not exact, but root
    mean square pixel difference at most `max_rms` on the 0-255 scale).

    The search is exact, not a heuristic: averaging over blocks cannot increase a root mean
    square difference, so every pair within `max_rms` in pixels is within it in thumbnails.
    Thumbnail distances (one matrix product per chunk) make the shortlist; full pixels
    confirm it. Smooth images whose perceptual hashes collide are told apart by their pixels.
    Shifted, cropped, flipped or recoloured copies are not looked for."""
    train_index: dict[bytes, int] = {}
    for i, image in enumerate(train):
        train_index.setdefault(image.tobytes(), i)
    exact = {
        i: train_index[image.tobytes()]
        for i, image in enumerate(test)
        if image.tobytes() in train_index
    }

    small_train = thumbnails(train)
    train_norms = (small_train.astype(np.float64) ** 2).sum(axis=1)
    dims = small_train.shape[1]
    limit = (max_rms**2) * dims + 1.0  # + 1: float32 rounding in the product
    flat_train = train.reshape(len(train), -1)
    near: dict[int, tuple[int, float]] = {}
    rest = np.array([i for i in range(len(test)) if i not in exact], dtype=np.int64)
    for start in range(0, len(rest), chunk):
        rows = rest[start : start + chunk]
        small = thumbnails(test[rows])
        squared = (
            (small.astype(np.float64) ** 2).sum(axis=1)[:, None]
            + train_norms[None, :]
            - 2 * (small @ small_train.T).astype(np.float64)
        )
        for r, candidates in zip(rows, squared <= limit, strict=True):
            found = np.flatnonzero(candidates)
            if len(found) == 0:
                continue
            pixels = test[r].reshape(1, -1).astype(np.float64)
            rms = np.sqrt(((flat_train[found].astype(np.float64) - pixels) ** 2).mean(axis=1))
            best = int(rms.argmin())
            if rms[best] <= max_rms:
                near[int(r)] = (int(found[best]), float(rms[best]))
    return {
        "exact": [{"test": t, "train": exact[t]} for t in sorted(exact)],
        "near": [{"test": t, "train": near[t][0], "rms": near[t][1]} for t in sorted(near)],
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


# --- two models ------------------------------------------------------------------------


def compare_predictions(
    labels: np.ndarray, small: np.ndarray, large: np.ndarray, classes: int
) -> dict:
    """Two models' predictions on the same images: agreement, who is right where, and
    whether one model's errors are contained in the other's."""
    right_small, right_large = small == labels, large == labels
    wrong_small, wrong_large = ~right_small, ~right_large
    both_wrong = int((wrong_small & wrong_large).sum())
    n = len(labels)
    present = np.bincount(labels, minlength=classes) > 0  # better/worse/equal: among these
    counts = np.maximum(np.bincount(labels, minlength=classes), 1)
    acc_small = np.bincount(labels, weights=right_small, minlength=classes) / counts
    acc_large = np.bincount(labels, weights=right_large, minlength=classes) / counts
    return {
        "images": n,
        "agreement": float((small == large).mean()),
        "both_right": int((right_small & right_large).sum()),
        "only_small_right": int((right_small & wrong_large).sum()),
        "only_large_right": int((wrong_small & right_large).sum()),
        "both_wrong": both_wrong,
        # If the two models erred independently: n * P(small wrong) * P(large wrong).
        "both_wrong_if_independent": float(wrong_small.mean() * wrong_large.mean() * n),
        "small_errors": int(wrong_small.sum()),
        "large_errors": int(wrong_large.sum()),
        "share_of_small_errors_also_large_errors": _share(both_wrong, wrong_small.sum()),
        "share_of_large_errors_also_small_errors": _share(both_wrong, wrong_large.sum()),
        "small_errors_subset_of_large": bool(not (wrong_small & right_large).any()),
        "large_errors_subset_of_small": bool(not (wrong_large & right_small).any()),
        "per_class_small": acc_small.tolist(),
        "per_class_large": acc_large.tolist(),
        "per_class_gain": (acc_large - acc_small).tolist(),
        "classes_better": int((acc_large > acc_small)[present].sum()),
        "classes_worse": int((acc_large < acc_small)[present].sum()),
        "classes_equal": int((acc_large == acc_small)[present].sum()),
    }


def _share(part: int, whole: int) -> float | None:
    return float(part / whole) if whole else None
