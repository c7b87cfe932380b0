"""The traffic report's measures (training/report/traffic.py) against small cases worked
out by hand, and its page's escaping. The report on a real payload log is tested in
tests/test_payloads.py."""

import json
import math
import pickle
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.columns import PAYLOAD_SCHEMA
from contract.modelcard import ModelCard
from tests.synthetic import CLASS_NAMES, FINE_TO_COARSE, SUPERCLASS_NAMES, write_cifar100
from training.__main__ import main as training
from training.data import Cifar100, Split
from training.report.pages import environment
from training.report.traffic import Classes, analyse, familiarity, mix, top2_pairs

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
    report = analyse(rows, Classes.of(None, data), "m")
    assert report["never_answered"] == ["apple", "bear"]
    assert report["confidence"] == [{"class": "<b>cat</b>", "images": 4, "mean": 0.75}]
    assert report["familiarity"]["overall"]["images"] == 3  # the null one left out
    page = environment.get_template("traffic.html").render(report=report)
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page
    assert "1 of 3 images (33.3%)" in page


def card_only_file(path, counts: list[int] | None) -> None:
    """An ONNX file holding only a model card (the traffic page reads nothing else of it)."""
    import onnx
    from onnx import TensorProto, helper

    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xy")
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "card", [x], [y])
    proto = helper.make_model(graph)
    card = ModelCard(
        model_id=path.stem,
        class_names=CLASS_NAMES,
        superclass_names=SUPERCLASS_NAMES,
        fine_to_coarse=FINE_TO_COARSE,
        parameter_count=1,
        training_class_counts=counts,
    )
    helper.set_model_props(proto, card.to_metadata())
    onnx.save(proto, path)


def payload_log(folder, model_id: str, top1: np.ndarray) -> None:
    """A payload shard as the service writes it, one row per answered top class."""
    n = len(top1)
    rows = {
        "time": [datetime(2026, 12, 8, 1, 0, i % 60, tzinfo=UTC) for i in range(n)],
        "request_id": [f"r{i}" for i in range(n)],
        "route": ["/predict"] * n,
        "image": [0] * n,
        "model_id": [model_id] * n,
        "model_version": ["v1"] * n,
        "pixels": [bytes(32 * 32 * 3)] * n,
        "top_classes": [[int(c), (int(c) + 1) % 100] for c in top1],
        "top_labels": [[CLASS_NAMES[c], CLASS_NAMES[(c + 1) % 100]] for c in top1],
        "top_probabilities": [[0.7, 0.2]] * n,
        "familiarity": [0.5] * n,
    }
    rows |= {name: [None] * n for name in PAYLOAD_SCHEMA.names if name not in rows}  # not shadowed
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=PAYLOAD_SCHEMA), folder / "shard-0.parquet")


def test_the_traffic_page_needs_no_dataset_when_the_card_counts_the_training_classes(
    tmp_path, monkeypatch
):
    # A skewed training set written as a cifar-100-python folder; its labels, read back from
    # the pickle, are counted here. The dataset is then not given: $CIFAR100_DIR names an
    # empty folder (a load would fail there) and no --data-dir.
    folder = write_cifar100(tmp_path / "data", train_per_class=2, test_per_class=1)
    labels = np.array(pickle.loads((folder / "train").read_bytes())[b"fine_labels"])
    labels = np.concatenate([labels, np.full(30, 7)])
    counts = np.bincount(labels, minlength=100)
    models = tmp_path / "models"
    models.mkdir()
    card_only_file(models / "m.onnx", counts.tolist())
    rng = np.random.default_rng(3)
    top1 = rng.integers(0, 100, 400)
    payload_log(tmp_path / "log", "m", top1)
    monkeypatch.setenv("CIFAR100_DIR", str(tmp_path / "empty"))
    reports = tmp_path / "reports"
    command = ["report", "--traffic", str(tmp_path / "log"), "--models-dir", str(models),
               "--reports-dir", str(reports)]  # fmt: skip
    assert training(command) == 0
    report = json.loads((reports / "m" / "traffic.json").read_text())
    assert report["training_counts_from"] == "the model card"
    shares = [r["train_share"] for r in report["classes"]["rows"]]
    assert shares == pytest.approx(counts / counts.sum())
    supers = np.zeros(20)
    np.add.at(supers, np.take(FINE_TO_COARSE, labels), 1)
    assert [r["train_share"] for r in report["superclasses"]["rows"]] == pytest.approx(
        supers / supers.sum()
    )
    expected = counts / counts.sum() * len(top1)
    observed = np.bincount(top1, minlength=100)
    assert report["classes"]["chi_square"] == pytest.approx(
        (((observed - expected) ** 2) / expected).sum()
    )


def test_a_card_without_counts_and_no_dataset_says_the_mix_is_unavailable(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    card_only_file(models / "old.onnx", None)
    payload_log(tmp_path / "log", "old", np.arange(50) % 100)
    monkeypatch.delenv("CIFAR100_DIR", raising=False)
    reports = tmp_path / "reports"
    command = ["report", "--traffic", str(tmp_path / "log"), "--models-dir", str(models),
               "--reports-dir", str(reports)]  # fmt: skip
    assert training(command) == 0
    report = json.loads((reports / "old" / "traffic.json").read_text())
    assert report["classes"] == {"available": False} == report["superclasses"]
    assert report["never_answered"] is None
    page = (reports / "old" / "traffic.html").read_text()
    assert "cannot be compared with the training set" in page
    assert not (reports / "old" / "traffic_classes.png").exists()
    # With the dataset named, its training labels are the mix, as before the card had them.
    data_dir = write_cifar100(tmp_path / "data", train_per_class=3, test_per_class=1)
    command += ["--data-dir", str(data_dir), "--val-size", "100"]
    assert training(command) == 0
    report = json.loads((reports / "old" / "traffic.json").read_text())
    assert report["training_counts_from"].startswith("the dataset")
    assert [r["train_share"] for r in report["classes"]["rows"]] == pytest.approx([0.01] * 100)


def test_the_card_checks_its_training_counts():
    card = dict(model_id="m", class_names=CLASS_NAMES, superclass_names=SUPERCLASS_NAMES,
                fine_to_coarse=FINE_TO_COARSE, parameter_count=1)  # fmt: skip
    for wrong in ([1] * 99, [1] * 99 + [-1], [1.5] * 100):
        with pytest.raises(ValueError, match="training_class_counts"):
            ModelCard(**card, training_class_counts=wrong)
    counts = list(range(100))
    back = ModelCard.from_metadata(ModelCard(**card, training_class_counts=counts).to_metadata())
    assert back.training_class_counts == counts
    assert "training_class_counts" not in ModelCard(**card).to_metadata()
