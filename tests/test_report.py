"""The report on the test-suite dataset: files exist, numbers agree with each other and
with the exported model's card, the page shows the JSON's values, and the service serves it."""

import json
import re

import numpy as np
import onnx
import pytest

from service.modelcard import ModelCard
from tests.service_helpers import serve
from training.__main__ import main
from training.report import NEAR_DUPLICATE_BITS, duplicates

SMALL = "cifar100-712868"


@pytest.fixture(scope="session")
def reports_dir(workspace, cifar_tarball):
    out = workspace / "reports"
    args = ["report", "--models-dir", str(workspace / "models"), "--reports-dir", str(out)]
    assert main([*args, "--data-dir", str(cifar_tarball), "--val-size", "500"]) == 0
    return out


@pytest.fixture(scope="session")
def report(reports_dir):
    return json.loads((reports_dir / SMALL / "report.json").read_text())


def test_every_model_gets_a_page_with_all_its_pictures(reports_dir):
    for model_id in ("cifar100-712868", "cifar100-5735844"):
        page = (reports_dir / model_id / "index.html").read_text()
        pictures = re.findall(r'<img src="([^"]+)"', page)
        assert len(pictures) == 9
        for name in pictures:
            assert (reports_dir / model_id / name).read_bytes().startswith(b"\x89PNG")
        assert "http" not in page  # renders offline


def test_numbers_agree_with_each_other(report, workspace):
    confusion = np.array(report["confusion_matrix"])
    counts = report["dataset"]["test_images_per_class"]
    assert report["dataset"]["train_images_per_class"] == [40] * 100  # train + validation
    assert confusion.sum(axis=1).tolist() == counts
    assert np.trace(confusion) / confusion.sum() == pytest.approx(report["top1_accuracy"])
    # A balanced test set: per-class accuracies average to top-1.
    assert np.mean(list(report["per_class_accuracy"].values())) == pytest.approx(
        report["top1_accuracy"]
    )
    assert report["errors"] == confusion.sum() - np.trace(confusion)
    assert sum(p["count"] for p in report["most_confused_pairs"]) <= report["errors"]
    assert report["most_confused_pairs"] == sorted(
        report["most_confused_pairs"], key=lambda p: -p["count"]
    )
    assert sum(b["count"] for b in report["calibration"]["bins"]) == report["images"]
    assert 0 <= report["calibration"]["expected_calibration_error"] <= 1
    assert report["errors_within_superclass_by_chance"] == pytest.approx(4 / 99)
    assert report["original_accuracy"] == 0.37
    assert report["best_classes"] == list(report["per_class_accuracy"])[:10]

    # The same model, the same test set: the export's own evaluation says the same.
    proto = onnx.load(workspace / "models" / f"{SMALL}.onnx")
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert report["top1_accuracy"] == pytest.approx(card.evaluation["top1_accuracy"])
    assert report["superclass_accuracy"] == pytest.approx(card.evaluation["superclass_accuracy"])


def test_errors_within_superclass_are_counted_from_the_confusion_matrix(report):
    from tests.synthetic import FINE_TO_COARSE

    confusion = np.array(report["confusion_matrix"])
    coarse = np.array(FINE_TO_COARSE)
    same = coarse[:, None] == coarse[None, :]
    off = ~np.eye(100, dtype=bool)
    expected = confusion[same & off].sum() / confusion[off].sum()
    assert report["errors_within_superclass"] == pytest.approx(expected)


def test_page_shows_the_json_values(reports_dir, report):
    page = (reports_dir / SMALL / "index.html").read_text()
    headline = dict(re.findall(r"<tr><th>([^<]+)</th><td class=\"num\">([^<]+)</td></tr>", page))
    assert headline["top-1 accuracy"] == f"{report['top1_accuracy']:.1%}"
    assert headline["top-5 accuracy"] == f"{report['top5_accuracy']:.1%}"
    assert headline["superclass accuracy"] == f"{report['superclass_accuracy']:.1%}"
    ece = report["calibration"]["expected_calibration_error"]
    assert headline["expected calibration error"] == f"{ece:.4f}"
    assert f'<b id="within">{report["errors_within_superclass"]:.1%}</b>' in page
    dataset = report["dataset"]
    assert f'<b id="exact">{dataset["test_with_exact_duplicate_in_train"]}</b>' in page
    assert f'<b id="near">{dataset["test_with_near_duplicate_in_train"]}</b>' in page
    for name, accuracy in report["per_class_accuracy"].items():
        assert f'<tr><td>{name}</td><td class="num">{accuracy:.1%}</td></tr>' in page


def test_report_is_deterministic(reports_dir, workspace, cifar_tarball, tmp_path):
    args = ["report", "--model", SMALL, "--models-dir", str(workspace / "models")]
    args += ["--reports-dir", str(tmp_path), "--data-dir", str(cifar_tarball), "--val-size", "500"]
    assert main(args) == 0
    for path in (reports_dir / SMALL).iterdir():
        assert (tmp_path / SMALL / path.name).read_bytes() == path.read_bytes(), path.name


def test_duplicates_finds_exact_and_near_twins():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    brighter = np.clip(train[1].astype(int) + 3, 0, 255).astype(np.uint8)  # same picture
    test = np.stack([train[0], brighter, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)])
    exact, near = duplicates(test, train)
    assert exact == 1
    assert near == 2 and NEAR_DUPLICATE_BITS < 8


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
