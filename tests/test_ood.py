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
from training.scores import PAIRS, SCORES, SINGLE, combined
from training.scores.base import Inputs, Training
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
    result = json.loads((root / "familiarity.json").read_text())["models"][SMALL]
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


def test_every_scores_numbers_are_sklearns_from_the_model(measured, small_tarball):
    """Every score's AUROC and the baseline's, recomputed outside the measurement: the
    run's checkpoint, each score fitted here on its training images (the known classes'),
    the held-out test images and two families regenerated from their seed, sklearn's
    roc_auc_score with the known photos positive and minus the strangeness as the score
    (larger = more familiar). A sign flipped anywhere in the measurement fails it."""
    root, _ = measured
    result = json.loads((root / "familiarity.json").read_text())["models"][SMALL]
    data = cifar.load(small_tarball, val_size=SMALL_VAL_SIZE)
    kept = cifar.without_classes(data, HELD_OUT)
    model = keras.models.load_model(best_checkpoint(root / "runs/ood/class_03-class_07-s0" / SMALL))
    known = known_test_images(data, HELD_OUT)
    photos = data.test.images[known]
    generated = families.generate(40, 0, photos)
    features_model = keras.Model(model.inputs, model.get_layer("predictions").input)
    kernel, bias = model.get_layer("predictions").get_weights()

    def features(images: np.ndarray) -> np.ndarray:
        return np.asarray(features_model.predict(images, verbose=0), np.float32)

    training = Training(features(kept.train.images), kept.train.fine, kernel, bias,
                        images=kept.train.images)  # fmt: skip
    fitted = {name: fit(training) for name, fit in SINGLE.items()}
    known_features = features(photos)

    def strangeness(images: np.ndarray, feats: np.ndarray) -> dict[str, np.ndarray]:
        """Every single score's, and every combination's from the percentiles written out
        with np.interp over the training images' score quantiles (as tests/test_scores.py)."""
        found = {score: f.strangeness(Inputs(images, feats)) for score, f in fitted.items()}
        train = {score: f.strangeness(training.inputs) for score, f in fitted.items()}
        positions = (np.arange(combined.QUANTILES) + 0.5) / combined.QUANTILES
        share = {}
        for part, values in train.items():
            q = np.unique(np.quantile(values, positions).astype(np.float32)).astype(np.float64)
            x = found[part].astype(np.float32).astype(np.float64)
            tail = np.maximum(x - q[-1], 0) / (q[-1] - q[0])
            share[part] = np.interp(x, q, np.linspace(0, 1, len(q))) + tail
        for first, second in PAIRS:
            found[f"either:{first},{second}"] = np.maximum(share[first], share[second])
            found[f"mean:{first},{second}"] = (share[first] + share[second]) / 2
        return found

    known_values = strangeness(photos, known_features)
    sets = {NEAR: data.test.images[~known], **{n: generated[n] for n in ("gratings", "text")}}
    for name, others in sets.items():
        labels = np.r_[np.ones(len(photos)), np.zeros(len(others))]
        other_values = strangeness(others, features(others))
        assert set(other_values) == set(SCORES)
        for score in other_values:
            values = -np.r_[known_values[score], other_values[score]]
            expected = roc_auc_score(labels, values)
            got = result["runs"][0]["sets"][name][score]["auroc"]
            assert got == pytest.approx(expected, abs=1e-3), (name, score)
        top = np.r_[model.predict(photos, verbose=0).max(axis=1),
                    model.predict(others, verbose=0).max(axis=1)]  # fmt: skip
        expected = roc_auc_score(labels, top)
        assert result["runs"][0]["sets"][name]["msp"]["auroc"] == pytest.approx(expected, abs=1e-6)


def test_a_rerun_measures_again_without_training_again(measured):
    root, argv = measured
    checkpoint = best_checkpoint(root / "runs/ood/class_03-class_07-s0" / SMALL)
    before = checkpoint.stat().st_mtime_ns
    assert main(argv) == 0
    assert best_checkpoint(checkpoint.parent) == checkpoint
    assert checkpoint.stat().st_mtime_ns == before


def test_the_choice_is_made_on_one_half_and_judged_on_the_other(measured):
    root, _ = measured
    result = json.loads((root / "familiarity.json").read_text())["models"][SMALL]
    summary = result["summary"]
    splits = result["choice"]["splits"]
    assert len(splits) == 6  # three seeds, each also reversed
    for split in splits:
        choosing, judging = split["choosing"], split["judging"]
        assert not set(choosing) & set(judging)
        assert set(choosing) | set(judging) == set(families.FAMILIES)
        for kind, named in families.KINDS.items():  # every kind on both sides
            assert set(named) & set(choosing) and set(named) & set(judging), kind

        # The chosen score is the best on the choosing half alone, recomputed here.
        def merit(score, choosing=choosing):
            far = np.mean([summary[f][score]["auroc"] for f in choosing])
            return (summary[NEAR][score]["auroc"] + far) / 2

        assert merit(split["exportable"]) == pytest.approx(max(merit(s) for s in SCORES))
        assert split["exportable"] in SCORES
        assert set(split["judged"]) == {NEAR, *judging}
        for name in judging:
            assert split["judged"][name]["msp"] == summary[name]["msp"]["auroc"]
    first, reverse = splits[0], splits[1]
    assert first["choosing"] == reverse["judging"] and first["judging"] == reverse["choosing"]


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
    assert first["flat grey"].std(axis=3).max() == 0  # grey: the channels equal
    # A shuffled photo holds some photo's own pixels, rearranged.
    sorted_photos = [np.sort(p.ravel()) for p in photos]
    for image in first["shuffled photos"]:
        assert any(np.array_equal(np.sort(image.ravel()), p) for p in sorted_photos)
