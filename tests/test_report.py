"""The report: each measure against a small case worked out by hand, each sentence against
both outcomes, then the real command on the test-suite models: files, numbers, pages,
the comparison page, determinism and the service."""

import html
import io
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from markupsafe import escape
from PIL import Image

from contract.modelcard import ModelCard
from tests.service_helpers import serve
from training.__main__ import main
from training.evaluate import compute_metrics
from training.report import measures
from training.report.dataset import NEAR_DUPLICATE_MAX_RMS
from training.report.pages import render, render_compare
from training.report.sentences import (
    capacity_sentences,
    say_calibration,
    say_mean_per_class,
    say_recovery,
    say_uncertainty,
    say_within,
)
from training.report.write import COMPARE_DIR

SMALL, LARGE = "cifar100-712868", "cifar100-5735844"

# --- measures, worked by hand -----------------------------------------------------------


def test_both_superclass_accuracies_are_named_apart():
    # Superclasses: x = classes {0, 3}, y = {1, 2}.
    probabilities = np.array([[0.4, 0.3, 0.3, 0.0], [0.1, 0.2, 0.3, 0.4]])
    metrics = compute_metrics(
        probabilities, np.array([0, 3]), [0, 1, 1, 0], list("abcd"), ["x", "y"]
    )
    # Image 0: top class 0 (x, right); summed x 0.4 < y 0.6 (wrong).
    # Image 1: top class 3 (x, right); summed x 0.5 = y 0.5, first wins (x, right).
    assert metrics["superclass_of_top_class_accuracy"] == 1.0
    assert metrics["summed_superclass_accuracy"] == 0.5
    assert metrics["per_superclass_summed_accuracy"] == {"x": 0.5, "y": None}
    assert "superclass_accuracy" not in metrics  # no ambiguous name left


def test_within_superclass_share_chance_and_binomial_test():
    to_coarse = np.array([0, 0, 1, 1])  # chance for an error: 1 of 3 other classes
    true = np.array([0, 0, 1, 1, 2, 3])
    predicted = np.array([1, 2, 1, 3, 3, 0])  # errors: same, cross, -, cross, same, cross
    w = measures.within_superclass(true, predicted, to_coarse)
    assert (w["errors"], w["within"]) == (5, 2)
    assert w["share"] == pytest.approx(0.4)
    assert w["chance"] == pytest.approx(1 / 3)
    assert w["ratio_to_chance"] == pytest.approx(1.2)
    # Binomial(5, 1/3): P(2) = 80/243 is the most likely outcome, so every outcome is at
    # most as likely: the two-sided p-value is 1.
    assert w["p_value"] == pytest.approx(1.0)


def test_distances_between_classes():
    d = measures.cosine_distances(np.array([[1.0, 0], [0, 1], [1, 1], [0, 0]]))
    assert d[0, 1] == pytest.approx(1) and d[0, 2] == pytest.approx(1 - 1 / np.sqrt(2))
    assert d[3, 0] == pytest.approx(1) and d[3, 3] == 0  # a zero row is far from everything
    confusion = np.array([[8, 2, 0], [0, 10, 0], [5, 0, 5]])
    d = measures.confusion_distances(confusion)
    # Rates: 0->1 0.2, 2->0 0.5; similarity is the mean of both directions.
    assert d[0, 1] == pytest.approx(0.9) and d[1, 0] == pytest.approx(0.9)
    assert d[0, 2] == pytest.approx(0.75) and d[1, 2] == pytest.approx(1.0)
    means = measures.class_means(np.array([[1.0, 2], [3, 4], [10, 10]]), np.array([0, 0, 2]), 3)
    assert means.tolist() == [[2, 3], [0, 0], [10, 10]]


@pytest.fixture
def six_classes():
    """Six classes on a line at 0, 1, 2, 10, 11, 25; superclasses {0, 1, 2} and {3, 4, 5}."""
    positions = np.array([0, 1, 2, 10, 11, 25], dtype=float)
    return np.abs(positions[:, None] - positions[None, :]), np.array([0, 0, 0, 1, 1, 1])


def test_superclass_recovery_on_a_case_worked_by_hand(six_classes):
    distances, to_coarse = six_classes
    r = measures.superclass_recovery(distances, to_coarse, clusters=3, k=2, pairs=2)
    # Average linkage: {0,1} and {3,4} at 1, {0,1,2} at 1.5; then {3,4}+{5} costs 14.5,
    # {0,1,2}+{3,4} 9.5, so the cut into 3 is {0,1,2} {3,4} {5}.
    groups = np.array(r["groups"])
    assert r["clusters"] == 3
    assert len({*groups[:3]}) == 1 and groups[3] == groups[4] != groups[5] != groups[0]
    # ARI: pairs together in both 3 + 1 = 4; official pairs 3 + 3 = 6; learned 3 + 1 = 4;
    # all pairs 15; expected 6 * 4 / 15 = 1.6; max (6 + 4) / 2 = 5 -> (4 - 1.6) / (5 - 1.6).
    assert r["adjusted_rand_index"] == pytest.approx(12 / 17)
    # 2 nearest: 0 -> 1, 2; 1 -> 0, 2; 2 -> 1, 0; 3 -> 4, 2; 4 -> 3, 2; 5 -> 4, 3.
    assert r["nearest_same_superclass_share_per_class"] == [1, 1, 1, 0.5, 0.5, 1]
    assert r["nearest_same_superclass_share"] == pytest.approx(5 / 6)
    assert r["nearest_same_superclass_chance"] == pytest.approx(2 / 5)
    assert r["nearest_ratio_to_chance"] == pytest.approx(25 / 12)
    assert r["split_superclasses"] == [{"superclass": 1, "parts": [[3, 4], [5]]}]
    # Closest cross-superclass pairs: 2-3 at 8, then 1-3 and 2-4 at 9 (ties by index).
    assert r["closest_cross_superclass_pairs"] == [
        {"a": 2, "b": 3, "distance": 8.0},
        {"a": 1, "b": 3, "distance": 9.0},
    ]


def test_a_grouping_that_matches_the_superclasses_scores_one(six_classes):
    _, to_coarse = six_classes
    positions = np.array([0, 1, 2, 50, 51, 52], dtype=float)
    distances = np.abs(positions[:, None] - positions[None, :])
    r = measures.superclass_recovery(distances, to_coarse, clusters=2, k=2)
    assert r["adjusted_rand_index"] == pytest.approx(1.0)
    assert r["split_superclasses"] == [] and r["nearest_same_superclass_share"] == 1.0


def test_entropy_and_the_most_uncertain_images():
    p = np.array([[1, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0], [0.25] * 4])
    assert measures.entropy_bits(p).tolist() == [0.0, 2.0, 1.0, 2.0]
    assert measures.most_uncertain(p, 3).tolist() == [1, 3, 2]  # ties by index


def test_per_class_calibration():
    labels = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])  # predicts 0, 0, 1, 0
    c = measures.per_class_calibration(p, labels, 2)
    assert c["accuracy"] == [1.0, 0.5]
    assert c["confidence"] == pytest.approx([0.75, 0.75])
    assert c["gap"] == pytest.approx([-0.25, 0.25])  # class 0 under-, class 1 over-confident


def test_label_issues_finds_the_mislabelled_image():
    labels = np.repeat(np.arange(3), 10)
    p = np.full((30, 3), 0.05)
    p[np.arange(30), labels] = 0.9
    p[5] = [0.02, 0.96, 0.02]  # labelled 0, looks like a 1
    p[12] = [0.3, 0.4, 0.3]  # labelled 1, unsure but right
    result = measures.label_issues(labels, p, 5)
    assert result["count"] == 1
    assert result["candidates"] == [
        {
            "index": 5,
            "given": 0,
            "suggested": 1,
            "given_probability": pytest.approx(0.02),
            "suggested_probability": pytest.approx(0.96),
        }
    ]


def test_compare_predictions_on_a_case_worked_by_hand():
    labels = np.array([0, 1, 2, 3, 0, 1])
    small = np.array([0, 1, 0, 0, 1, 1])  # right on 0, 1, 5
    large = np.array([0, 1, 2, 0, 1, 2])  # right on 0, 1, 2
    c = measures.compare_predictions(labels, small, large, 4)
    assert c["agreement"] == pytest.approx(4 / 6)
    assert (c["both_right"], c["only_small_right"], c["only_large_right"], c["both_wrong"]) == (
        2,
        1,
        1,
        2,
    )
    assert c["both_wrong_if_independent"] == pytest.approx(0.5 * 0.5 * 6)
    assert c["share_of_small_errors_also_large_errors"] == pytest.approx(2 / 3)
    assert not c["small_errors_subset_of_large"] and not c["large_errors_subset_of_small"]
    assert c["per_class_small"] == [0.5, 1.0, 0.0, 0.0]
    assert c["per_class_large"] == [0.5, 0.5, 1.0, 0.0]
    assert (c["classes_better"], c["classes_worse"], c["classes_equal"]) == (1, 1, 2)

    better = np.array([0, 1, 2, 3, 1, 1])  # wrong only where small is wrong too
    c = measures.compare_predictions(labels, small, better, 4)
    assert c["large_errors_subset_of_small"] and not c["small_errors_subset_of_large"]
    assert c["share_of_large_errors_also_small_errors"] == 1.0


def test_auroc_counts_pairs_and_halves_ties():
    known, other = np.array([0.5, 0.6, 0.7, 0.8]), np.array([0.1, 0.55, 0.9])
    # Known above other: 4 (over 0.1) + 3 (over 0.55) + 0 (over 0.9) of 12 pairs.
    assert measures.auroc(known, other) == pytest.approx(7 / 12)
    assert measures.auroc(other, known) == pytest.approx(5 / 12)  # the score upside down
    assert measures.auroc(np.array([1.0, 2.0]), np.array([2.0, 0.0])) == pytest.approx(2.5 / 4)
    assert measures.auroc(np.ones(5), np.ones(3)) == 0.5  # all tied: a coin
    assert measures.auroc(np.arange(10.0, 20), np.arange(10.0)) == 1.0
    with pytest.raises(ValueError):
        measures.auroc(known, np.array([]))


def test_false_positives_at_recall():
    known = np.arange(1, 101) / 100  # 0.01 .. 1.00
    other = np.array([0.03, 0.06, 0.5, 0.99])
    # 95 % of 100: reject the 5 lowest, so the threshold is the 6th, 0.06.
    r = measures.false_positives_at_recall(known, other, 0.95)
    assert r == {"threshold": 0.06, "recall": 0.95, "false_positive_rate": 0.75}
    # 90 % of 10: reject exactly one (1 - 0.9 is 0.0999... in floating point).
    r = measures.false_positives_at_recall(np.arange(10.0), np.array([0.5, 1.0]), 0.9)
    assert (r["threshold"], r["recall"], r["false_positive_rate"]) == (1.0, 0.9, 0.5)
    # Ties at the threshold are all accepted: recall can only come out higher.
    r = measures.false_positives_at_recall(np.array([0.0, 0.0, 0.0, 1.0]), np.zeros(2), 0.5)
    assert (r["threshold"], r["recall"], r["false_positive_rate"]) == (0.0, 1.0, 1.0)


# --- duplicates: exact and near, on smooth gradients and on a real photo -----------------


def gradient(colour, reverse=False) -> np.ndarray:
    ramp = np.linspace(0.1, 0.9, 32)[::-1] if reverse else np.linspace(0.1, 0.9, 32)
    return (ramp[None, :, None] * np.array(colour)[None, None, :] * np.ones((32, 1, 1))).astype(
        np.uint8
    )


def test_duplicates_tells_apart_smooth_gradients_that_share_a_hash():
    red, blue = gradient([255, 40, 40]), gradient([40, 40, 255])
    dark_grey, green = gradient([60, 60, 60], reverse=True), gradient([40, 255, 40], reverse=True)
    # The former test: the same 64-bit difference hash for unrelated smooth images.
    assert measures.dhash(red[None])[0] == measures.dhash(blue[None])[0]
    assert measures.dhash(dark_grey[None])[0] == measures.dhash(green[None])[0] == 0
    brighter_red = np.clip(red.astype(int) + 3, 0, 255).astype(np.uint8)
    train = np.stack([red, dark_grey])
    test = np.stack([red, brighter_red, blue, green])
    result = measures.find_duplicates(test, train, NEAR_DUPLICATE_MAX_RMS)
    assert result["exact"] == [{"test": 0, "train": 0}]
    assert result["near"] == [{"test": 1, "train": 0, "rms": pytest.approx(3.0)}]


def photo_crops() -> tuple[np.ndarray, np.ndarray]:
    """32x32 crops of a real photo shipped with matplotlib (Grace Hopper)."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB").resize((128, 160)))
    crops = [photo[y : y + 32, x : x + 32] for y in (16, 64, 112) for x in (8, 48, 88)]
    return np.stack(crops), photo


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_duplicates_on_a_real_photo():
    train, photo = photo_crops()
    shifted = photo[16 + 8 : 48 + 8, 8:40]  # the first crop moved 8 pixels: another image
    test = np.stack([train[4], jpeg(train[2], 90), shifted, 255 - train[0]])
    result = measures.find_duplicates(test, train, NEAR_DUPLICATE_MAX_RMS)
    assert result["exact"] == [{"test": 0, "train": 4}]
    assert [(n["test"], n["train"]) for n in result["near"]] == [(1, 2)]
    assert 0 < result["near"][0]["rms"] <= NEAR_DUPLICATE_MAX_RMS


def test_duplicate_search_misses_nothing_a_brute_force_finds():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (300, 32, 32, 3)).astype(np.uint8)
    test = np.clip(train[:40].astype(int) + rng.normal(0, 6, (40, 32, 32, 3)), 0, 255)
    test = test.astype(np.uint8)
    result = measures.find_duplicates(test, train, 6.0, chunk=7)
    rms = np.sqrt(
        ((test.reshape(40, 1, -1).astype(float) - train.reshape(1, 300, -1)) ** 2).mean(axis=2)
    )
    expected = sorted(np.flatnonzero(rms.min(axis=1) <= 6.0).tolist())
    assert 0 < len(expected) < 40  # the case has both outcomes
    assert [n["test"] for n in result["near"]] == expected


# --- sentences: a finding and its opposite ----------------------------------------------


def test_within_superclass_sentence_follows_the_numbers():
    strong = {
        "errors": 1000,
        "share": 0.3,
        "chance": 0.04,
        "ratio_to_chance": 7.5,
        "p_value": 1e-30,
    }
    text = say_within(strong, 0.01)
    assert "7.5 times what chance would give" in text and "lean towards similar" in text
    most = say_within({**strong, "share": 0.6, "ratio_to_chance": 15.0}, 0.01)
    assert "Most errors are between classes of the same superclass" in most
    chance = {
        "errors": 200,
        "share": 0.045,
        "chance": 0.04,
        "ratio_to_chance": 1.125,
        "p_value": 0.6,
    }
    text = say_within(chance, 0.01)
    assert "cannot tell from chance" in text and "no sign" in text and "similar things." in text
    assert "lean towards" not in text
    fewer = say_within({**chance, "share": 0.0, "ratio_to_chance": 0.0, "p_value": 1e-5}, 0.01)
    assert "fewer than chance" in fewer


def test_other_sentences_follow_the_numbers():
    assert "is the top-1 accuracy" in say_mean_per_class(0.5, 0.5, True)
    assert "not the top-1 accuracy" in say_mean_per_class(0.4, 0.5, False)
    assert say_calibration(0.8, 0.6).startswith("Over-confident")
    assert say_calibration(0.5, 0.6).startswith("Under-confident")
    assert "less sure where it is wrong" in say_uncertainty(0.5, 2.0)
    assert "no less sure" in say_uncertainty(2.0, 0.5)
    base = {
        "clusters": 20,
        "requested_clusters": 20,
        "nearest_k": 4,
        "nearest_same_superclass_chance": 4 / 99,
    }
    good = say_recovery(
        {
            **base,
            "adjusted_rand_index": 0.6,
            "nearest_same_superclass_share": 0.5,
            "nearest_ratio_to_chance": 0.5 * 99 / 4,
        },
        "features",
    )
    assert "largely recovers" in good and "12.4 times" in good
    bad = say_recovery(
        {**base, "adjusted_rand_index": 0.01, "nearest_same_superclass_share": 0.03}, "features"
    )
    assert "does not recover" in bad and "no more than" in bad


def test_capacity_sentences_follow_the_numbers():
    pair = {
        "small": "s",
        "large": "L",
        "classes_better": 60,
        "classes_worse": 30,
        "classes_equal": 10,
        "agreement": 0.7,
        "large_errors_subset_of_small": False,
        "small_errors_subset_of_large": False,
        "share_of_large_errors_also_small_errors": 0.8,
        "only_small_right": 5,
        "only_large_right": 9,
        "both_wrong": 40,
        "both_wrong_if_independent": 20.0,
    }
    s = capacity_sentences(pair)
    assert s["classes"].startswith("L is better than s on 60 classes")
    assert "not a subset" in s["large_subset"] and "5 images" in s["large_subset"]
    assert "fixes 9" in s["small_subset"] and "more than the 20.0" in s["joint"]
    s = capacity_sentences(
        {**pair, "classes_better": 20, "large_errors_subset_of_small": True, "both_wrong": 10}
    )
    assert "not better than s on most classes" in s["classes"]
    assert "only fixes mistakes" in s["large_subset"] and "no more than" in s["joint"]


# --- the real command on the test-suite models -----------------------------------------


@pytest.fixture(scope="session")
def reports_dir(workspace, cifar_tarball):
    return write_reports(workspace, cifar_tarball, workspace / "reports")


def write_reports(workspace: Path, cifar_tarball: Path, out: Path) -> Path:
    """`python -m training report` for both test-suite models into `out`."""
    args = ["report", "--models-dir", str(workspace / "models"), "--reports-dir", str(out)]
    assert main([*args, "--data-dir", str(cifar_tarball), "--val-size", "500"]) == 0
    return out


@pytest.fixture(scope="session")
def report(reports_dir):
    return json.loads((reports_dir / SMALL / "report.json").read_text())


@pytest.fixture(scope="session")
def comparison(reports_dir):
    return json.loads((reports_dir / COMPARE_DIR / "report.json").read_text())


def pages(reports_dir: Path) -> list[Path]:
    return [reports_dir / name / "index.html" for name in (SMALL, LARGE, COMPARE_DIR)]


def test_every_page_has_its_pictures_and_a_link_home(reports_dir):
    for path in pages(reports_dir):
        page = path.read_text()
        pictures = re.findall(r'<img src="([^"]+)"', page)
        assert len(pictures) >= (1 if path.parent.name == COMPARE_DIR else 14)
        for name in pictures:
            assert (path.parent / name).read_bytes().startswith(b"\x89PNG")
        assert "http" not in page  # renders offline
        assert '<nav class="top"><a href="/">' in page
        assert (path.parent / "report.json").exists()


# Each page says "Every number on this page is in report.json". To check which number each
# one claims to be, the page is rendered again from a copy of its JSON in which every number
# is a marker naming it (a float k-th number becomes FLOAT_MARK + k, an int INT_MARK + k):
# where the copy shows a marker, the real page must show that very number as the marker is
# formatted; anywhere else (row numbers, counts of rows, the words' own numbers) the same.
# (A list's min and max claim its first and last number: here every class has as many images.)
FLOAT_MARK, INT_MARK = 10**4, 10**8


def plant(value, leaves: list):
    """`value` with its numbers replaced by markers; the numbers are appended to `leaves`."""
    if isinstance(value, dict):
        return {key: plant(item, leaves) for key, item in value.items()}
    if isinstance(value, list):
        return [plant(item, leaves) for item in value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    leaves.append(value)
    k = len(leaves) - 1
    return INT_MARK + k if isinstance(value, int) else float(FLOAT_MARK + k)


def numbers_shown(page: str) -> list[tuple[str, str, str]]:
    """Every number a reader sees, in order: (sign and digits, decimals, "%" or "")."""
    text = html.unescape(re.sub(r"<style>.*?</style>|<[^>]+>", " ", page, flags=re.S))
    return re.findall(r"(?<![\w.\-])([-+]?\d+(?:\.(\d+))?)(%?)(?![\w\-])", text)


def claimed(marker: tuple[str, str, str], leaves: list) -> str | None:
    """The text the real page must show where the planted page shows `marker`, or None if
    that is no marker."""
    number, decimals, percent = marker
    value = float(number) / (100 if percent else 1)
    for base, kind in ((INT_MARK, int), (FLOAT_MARK, float)):
        k = round(value) - base
        if 0 <= k < len(leaves) and isinstance(leaves[k], kind):
            sign = "+" if number.startswith("+") else ""
            spec = f"{sign}.{len(decimals)}{'%' if percent else 'f'}"
            return format(leaves[k], spec) if decimals or percent else str(leaves[k])
    return None


def test_every_number_on_every_page_is_the_json_value_it_claims(reports_dir):
    for path in pages(reports_dir):
        saved = json.loads((path.parent / "report.json").read_text())
        draw = render_compare if path.parent.name == COMPARE_DIR else render
        page = path.read_text()
        assert draw(saved) == page  # the page is its JSON and nothing else
        leaves: list = []
        shown, planted = numbers_shown(page), numbers_shown(draw(plant(saved, leaves)))
        assert len(shown) > 50 and len(shown) == len(planted)
        markers = 0
        for real, marker in zip(shown, planted, strict=True):
            expected = claimed(marker, leaves)
            markers += expected is not None
            text = real[0] + real[2]
            assert text == (expected or marker[0] + marker[2]), (path, text, marker)
        assert markers > 30  # the pages do show the JSON's numbers


def test_numbers_agree_with_each_other(report, workspace):
    confusion = np.array(report["confusion_matrix"])
    counts = report["dataset"]["test_images_per_class"]
    assert report["dataset"]["train_images_per_class"] == [40] * 100  # train + validation
    assert confusion.sum(axis=1).tolist() == counts
    assert np.trace(confusion) / confusion.sum() == pytest.approx(report["top1_accuracy"])
    assert report["test_images_per_class_equal"]  # 5 each: then the mean is top-1
    assert report["mean_per_class_accuracy"] == pytest.approx(report["top1_accuracy"])
    w = report["errors_within_superclass"]
    assert w["errors"] == confusion.sum() - np.trace(confusion)
    assert w["chance"] == pytest.approx(4 / 99)
    assert sum(b["count"] for b in report["calibration"]["bins"]) == report["images"]
    assert report["original_accuracy"] == 0.37
    assert report["best_classes"] == list(report["per_class_accuracy"])[:10]
    per_class = report["class_calibration"]["per_class"]
    assert len(per_class) == 100 and all(
        r["gap"] > 0 for r in report["class_calibration"]["over_confident"]
    )
    for source in ("features", "confusion"):
        t = report["taxonomy"][source]
        assert -1 <= t["adjusted_rand_index"] <= 1 and len(t["groups"]) == 100
        assert t["nearest_same_superclass_chance"] == pytest.approx(4 / 99)
    uncertain = [u["entropy_bits"] for u in report["uncertainty"]["most_uncertain"]]
    assert uncertain == sorted(uncertain, reverse=True)
    issues = report["label_issues"]
    assert all(c["given"] != c["suggested"] for c in issues["candidates"])
    assert report["feature_maps"]["tsne_points"] == report["images"]  # 500: all of them

    # The same model, the same test set: the export's own evaluation says the same.
    proto = onnx.load(workspace / "models" / f"{SMALL}.onnx")
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    for key in ("top1_accuracy", "superclass_of_top_class_accuracy", "summed_superclass_accuracy"):
        assert report[key] == pytest.approx(card.evaluation[key]), key


def test_errors_within_superclass_are_counted_from_the_confusion_matrix(report):
    from tests.synthetic import FINE_TO_COARSE

    confusion = np.array(report["confusion_matrix"])
    coarse = np.array(FINE_TO_COARSE)
    same = coarse[:, None] == coarse[None, :]
    off = ~np.eye(100, dtype=bool)
    expected = confusion[same & off].sum() / confusion[off].sum()
    assert report["errors_within_superclass"]["share"] == pytest.approx(expected)


def test_page_shows_the_json_values_and_findings(reports_dir, report):
    page = (reports_dir / SMALL / "index.html").read_text()
    headline = dict(re.findall(r"<tr><th>([^<]+)</th><td class=\"num\">([^<]+)</td></tr>", page))
    assert headline["top-1 accuracy"] == f"{report['top1_accuracy']:.1%}"
    assert headline["superclass of the top class: accuracy"] == (
        f"{report['superclass_of_top_class_accuracy']:.1%}"
    )
    assert headline["summed superclass: accuracy"] == f"{report['summed_superclass_accuracy']:.1%}"
    for key, sentence in report["findings"].items():
        assert escape(sentence) in page, key
    dataset = report["dataset"]
    assert f'<b id="exact">{dataset["test_with_exact_duplicate_in_train"]}</b>' in page
    assert f'<b id="near">{dataset["test_with_near_duplicate_in_train"]}</b>' in page
    # The synthetic test images are fresh noise: no twins, yet the old hash had flagged some?
    assert dataset["test_with_exact_duplicate_in_train"] == 0
    assert "mostly between similar things" not in page  # the old fixed sentence
    for name, accuracy in report["per_class_accuracy"].items():
        assert f'<tr><td>{name}</td><td class="num">{accuracy:.1%}</td></tr>' in page


def test_pages_escape_the_names_a_user_supplies(report, comparison):
    """Class names come from the dataset's files: markup in one is shown, never run."""
    hostile = '<script>alert("x")</script> & co'
    for saved, draw, name in (
        (report, render, report["best_classes"][0]),
        (comparison, render_compare, comparison["pairs"][0]["most_gained"][0]["class"]),
    ):
        tampered = json.loads(json.dumps(saved).replace(json.dumps(name), json.dumps(hostile)))
        page = draw(tampered)
        assert "<script>" not in page and escape(hostile) in page


def test_comparison_page(reports_dir, report, comparison):
    assert [m["model_id"] for m in comparison["models"]] == [SMALL, LARGE]  # by size
    (pair,) = comparison["pairs"]
    assert (pair["small"], pair["large"]) == (SMALL, LARGE)
    assert pair["small_top1_accuracy"] == pytest.approx(report["top1_accuracy"])
    assert (
        sum(pair[k] for k in ("both_right", "only_small_right", "only_large_right", "both_wrong"))
        == report["images"]
    )
    small_per_class = {r["class"]: r["small"] for r in pair["per_class"]}
    assert small_per_class == pytest.approx(report["per_class_accuracy"])
    gains = [r["gain"] for r in pair["per_class"]]
    assert gains == sorted(gains, reverse=True)
    page = (reports_dir / COMPARE_DIR / "index.html").read_text()
    for sentence in pair["findings"].values():
        assert escape(sentence) in page


def test_report_is_deterministic(reports_dir, workspace, cifar_tarball, tmp_path):
    write_reports(workspace, cifar_tarball, tmp_path)
    for folder in (SMALL, LARGE, COMPARE_DIR):
        names = sorted(p.name for p in (reports_dir / folder).iterdir())
        assert names == sorted(p.name for p in (tmp_path / folder).iterdir())
        for name in names:  # HTML, JSON and every PNG
            assert (tmp_path / folder / name).read_bytes() == (
                reports_dir / folder / name
            ).read_bytes(), f"{folder}/{name}"


def test_service_serves_the_report(monkeypatch, workspace, reports_dir):
    with serve(monkeypatch, workspace / "models", reports_dir=reports_dir) as client:
        page = client.get(f"/models/{SMALL}/report")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert str(page.url).endswith(f"/models/{SMALL}/report/index.html")
        plot = client.get(f"/models/{SMALL}/report/confusion.png")
        assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
        assert client.get(f"/models/{SMALL}/report/report.json").json()["model_id"] == SMALL
        for bad in ("..%2F..%2Fpyproject.toml", "missing.png", "report.py"):
            assert client.get(f"/models/{SMALL}/report/{bad}").status_code == 404
        assert client.get("/models/nope/report").status_code == 404


def test_no_report_yet_is_a_clear_404(monkeypatch, workspace, tmp_path):
    with serve(monkeypatch, workspace / "models", reports_dir=tmp_path) as client:
        response = client.get(f"/models/{SMALL}/report")
        assert response.status_code == 404 and "make report" in response.json()["detail"]
