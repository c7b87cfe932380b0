"""`python -m training ood` end to end on the tests' small dataset: one model trained
without two classes, every score measured on them and on every image family, the numbers
checked against sklearn computed from the model itself."""

import json

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.conftest import SMALL_VAL_SIZE
from training import data as cifar
from training import families
from training.__main__ import main
from training.evaluate import known_test_images
from training.scores import SCORES
from training.scores.evidence import FAR, NEAR, table
from training.train import best_checkpoint

SMALL = "cifar100-712868"
HELD_OUT = ("class_03", "class_07")


@pytest.fixture(scope="module")
def measured(small_tarball, tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    argv = ["ood", "--model", SMALL, "--pairs", ",".join(HELD_OUT), "--seeds", "1",
            "--epochs", "1", "--batch-size", "64", "--no-augment", "--images", "40",
            "--data-dir", str(small_tarball), "--val-size", str(SMALL_VAL_SIZE),
            "--runs-dir", str(root / "runs"),
            "--output", str(root / "familiarity.json")]  # fmt: skip
    assert main(argv) == 0
    return root, argv


def test_every_score_and_the_baseline_on_every_set(measured):
    root, _ = measured
    result = json.loads((root / "familiarity.json").read_text())
    assert [run["held_out"] for run in result["runs"]] == [list(HELD_OUT)]
    assert list(result["summary"]) == [NEAR, *families.FAMILIES, FAR]
    for row in result["summary"].values():
        assert list(row) == [*SCORES, "msp"]
        for cell in row.values():
            assert 0 <= cell["auroc_min"] <= cell["auroc"] <= cell["auroc_max"] <= 1
            assert 0 <= cell["fpr"] <= 1
    assert set(result["families"]) == set(families.FAMILIES)
    assert all(result["families"].values())  # each family described in words
    assert result["machine"]["cpu"] and result["command"].startswith("python -m training ood")
    lines = table(result).splitlines()
    assert len(lines) == 2 + len(result["summary"]) and "msp" in lines[0]


def test_the_top_probabilitys_numbers_are_sklearns_from_the_model(measured, small_tarball):
    """The baseline's AUROC recomputed outside the measurement: the run's checkpoint, the
    held-out test images and a family regenerated from its seed, sklearn's roc_auc_score."""
    root, _ = measured
    result = json.loads((root / "familiarity.json").read_text())
    data = cifar.load(small_tarball, val_size=SMALL_VAL_SIZE)
    model = keras.models.load_model(best_checkpoint(root / "runs/ood/class_03-class_07-s0" / SMALL))
    known = known_test_images(data, HELD_OUT)
    photos = data.test.images[known]
    gratings = families.generate(40, 0, photos)["gratings"]

    def top(images: np.ndarray) -> np.ndarray:
        return model.predict(images, verbose=0).max(axis=1)

    for name, others in ((NEAR, data.test.images[~known]), ("gratings", gratings)):
        scores = np.concatenate([top(photos), top(others)])
        labels = np.r_[np.ones(len(photos)), np.zeros(len(others))]
        expected = roc_auc_score(labels, scores)
        assert result["runs"][0]["sets"][name]["msp"]["auroc"] == pytest.approx(expected, abs=1e-6)


def test_a_rerun_measures_again_without_training_again(measured):
    root, argv = measured
    checkpoint = best_checkpoint(root / "runs/ood/class_03-class_07-s0" / SMALL)
    before = checkpoint.stat().st_mtime_ns
    assert main(argv) == 0
    assert best_checkpoint(checkpoint.parent) == checkpoint
    assert checkpoint.stat().st_mtime_ns == before


def test_families_are_what_they_say_and_repeat_from_their_seed():
    photos = np.random.default_rng(0).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    first, again = families.generate(12, 3, photos), families.generate(12, 3, photos)
    for name, images in first.items():
        assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8, name
        np.testing.assert_array_equal(images, again[name])
    flat = first["flat colour"].reshape(12, -1, 3)
    assert (flat == flat[:, :1]).all()  # one colour each
    assert first["low-contrast noise"].std(axis=(1, 2)).max() < 8
    washed = first["washed-out photos"].astype(float)
    assert washed.std(axis=(1, 2, 3)).max() < 0.15 * photos.astype(float).std(axis=(1, 2, 3)).max()
    assert first["uniform noise"].std() > 60
