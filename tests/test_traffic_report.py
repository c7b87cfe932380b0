"""The traffic report's measures (training/report/traffic.py) against small cases worked
out by hand, and its page's escaping. The report on a real payload log is tested in
tests/test_payloads.py."""

import math

import numpy as np
import pytest

from training.data import Cifar100, Split
from training.report.pages import environment
from training.report.traffic import analyse, familiarity, mix, top2_pairs

NAMES = ["apple", "bear", "<b>cat</b>"]


def dataset(train_fine: list[int]) -> Cifar100:
    fine = np.array(train_fine)
    to_coarse = [0, 1, 1]
    split = Split(np.zeros((len(fine), 32, 32, 3), np.uint8), fine, np.take(to_coarse, fine))
    return Cifar100(split, split, split, NAMES, ["fruit", "animals"], to_coarse, "by hand")


def test_mix_chi_square_and_ratios_by_hand():
    # 40 images answered 30 / 10 / 0 against a uniform training set: 40/3 expected each,
    # chi-square = (30-40/3)^2/(40/3) + (10-40/3)^2/(40/3) + (40/3)^2/(40/3) = 35 on 2
    # degrees of freedom, whose survival function is exp(-x/2).
    m = mix(np.array([30, 10, 0]), np.array([5, 5, 5]), NAMES)
    assert m["chi_square"] == pytest.approx(35.0)
    assert m["degrees_of_freedom"] == 2
    assert m["p_value"] == pytest.approx(math.exp(-17.5))
    assert m["shifted"] and m["min_expected"] == pytest.approx(40 / 3)
    assert [r["name"] for r in m["most_over"]] == ["apple"]
    assert m["most_over"][0]["ratio"] == pytest.approx(0.75 / (1 / 3))
    assert [r["name"] for r in m["most_under"]] == ["<b>cat</b>", "bear"]


def test_a_mix_like_training_is_no_shift():
    m = mix(np.array([10, 10, 10]), np.array([5, 5, 5]), NAMES)
    assert m["chi_square"] == 0 and m["p_value"] == pytest.approx(1) and not m["shifted"]


def test_a_class_training_never_had_is_left_out_of_the_test_and_named():
    m = mix(np.array([5, 5, 3]), np.array([5, 5, 0]), NAMES)
    assert m["degrees_of_freedom"] == 1 and m["outside_training"] == ["<b>cat</b>"]


def test_top2_pairs_count_either_order():
    top = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1], [0, 1, 2]])
    pairs = top2_pairs(top, NAMES, 4)
    assert pairs[0] == {"a": "apple", "b": "bear", "images": 3, "share": 0.75}
    assert pairs[1] == {"a": "apple", "b": "<b>cat</b>", "images": 1, "share": 0.25}


def test_familiarity_buckets_by_hour_or_by_day():
    start = np.datetime64("2026-12-01T10:15:00.000")
    values = np.array([0.005, 0.5, 0.9, 0.001], np.float32)
    hours = start + np.array([0, 1, 60, 61], "timedelta64[m]")
    f = familiarity(values, hours)
    assert f["bucket"] == "hour"
    assert [(b["start"], b["images"], b["unfamiliar"]) for b in f["per_bucket"]] == [
        ("2026-12-01T10:00Z", 2, 1),
        ("2026-12-01T11:00Z", 2, 1),
    ]
    assert [i["row"] for i in f["most_unfamiliar"]] == [3, 0, 1, 2]
    days = start + np.array([0, 1, 3, 3], "timedelta64[D]")
    assert [b["start"] for b in familiarity(values, days)["per_bucket"]] == [
        "2026-12-01T00:00Z", "2026-12-02T00:00Z", "2026-12-04T00:00Z",
    ]  # fmt: skip
    overall = f["overall"]
    assert (overall["unfamiliar"], overall["unfamiliar_share"]) == (2, 0.5)
    # Two of four at most 0.01 where 1 % is expected: P(X >= 2) = 1 - 0.99^4 - 4*0.01*0.99^3,
    # and no outcome below 2 is less likely than 2 itself, so the two-sided p is that.
    assert overall["unfamiliar_p_value"] == pytest.approx(1 - 0.99**4 - 4 * 0.01 * 0.99**3)
    assert familiarity(np.full(3, np.nan, np.float32), hours[:3]) == {"available": False}


def test_the_page_escapes_names_and_says_what_analyse_found():
    data = dataset([0, 0, 1, 1, 2, 2])
    rows = {
        "time": np.datetime64("2026-12-01T10:15:00.000") + np.arange(4).astype("timedelta64[s]"),
        "model_version": np.array(["v1"] * 4),
        "route": np.array(["/predict"] * 4),
        "pixels": np.zeros((4, 32, 32, 3), np.uint8),
        "top_classes": np.array([[2, 0], [2, 1], [2, 0], [2, 0]]),
        "top_probabilities": np.array([[0.9, 0.1], [0.6, 0.3], [0.8, 0.1], [0.7, 0.2]]),
        "familiarity": np.array([0.5, 0.004, np.nan, 0.2], np.float32),
    }
    report = analyse(rows, data, "m")
    assert report["never_answered"] == ["apple", "bear"]
    assert report["confidence"] == [{"class": "<b>cat</b>", "images": 4, "mean": 0.75}]
    assert report["familiarity"]["overall"]["images"] == 3  # the null one left out
    page = environment.get_template("traffic.html").render(report=report)
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page
    assert "1 of 3 images (33.3%)" in page
