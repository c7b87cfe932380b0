"""The training loop on the synthetic dataset: it learns, it checkpoints, it resumes,
and a seed makes it repeatable."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tests.conftest import VAL_SIZE
from training import data as cifar
from training.train import (
    Recipe,
    _epoch_of,
    _forget_epochs_after_backup,
    best_checkpoint,
    train,
    train_dataset,
)


def history(run_dir):
    with (run_dir / "history.csv").open() as f:
        return list(csv.DictReader(f))


def test_training_learns_separable_classes(workspace):
    """Chance is 1 %: five epochs on 35 images per class must do far better."""
    run_dir = workspace / "runs" / "cifar100-712868"
    rows = history(run_dir)
    assert len(rows) == 5
    assert float(rows[-1]["val_accuracy"]) > 0.5
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["top1_accuracy"] > 0.5


def test_run_directory_keeps_only_the_best_checkpoint(workspace):
    run_dir = workspace / "runs" / "cifar100-712868"
    checkpoints = list(run_dir.glob("*.keras"))
    assert len(checkpoints) == 1
    match = re.fullmatch(r"cifar100-712868-(\d\d)-(\d\.\d\d)\.keras", checkpoints[0].name)
    assert match, checkpoints[0].name
    best_row = max(history(run_dir), key=lambda row: float(row["val_accuracy"]))
    assert float(match[2]) == round(float(best_row["val_accuracy"]), 2)
    assert best_checkpoint(run_dir) == checkpoints[0]
    assert json.loads((run_dir / "recipe.json").read_text())["recipe"]["epochs"] == 5
    assert any((run_dir / "logs").rglob("events.out.tfevents.*"))  # TensorBoard
    assert not (run_dir / "backup").exists()  # a finished run leaves nothing to resume


def test_evaluation_numbers_agree_with_each_other(workspace):
    evaluation = json.loads((workspace / "runs/cifar100-712868/evaluation.json").read_text())
    per_class = list(evaluation["per_class_accuracy"].values())
    assert len(per_class) == 100 and len(evaluation["per_superclass_accuracy"]) == 20
    # Balanced test set: the mean of per-class accuracies is the top-1 accuracy.
    assert np.mean(per_class) == pytest.approx(evaluation["top1_accuracy"])
    assert evaluation["top1_accuracy"] <= evaluation["top5_accuracy"]
    assert evaluation["top1_accuracy"] <= evaluation["superclass_accuracy"]


def test_same_seed_same_weights(cifar_dir, tmp_path):
    data = cifar.load(cifar_dir, val_size=VAL_SIZE)
    small = cifar.Cifar100(
        data.train.take(np.arange(256)), data.val, data.test,
        data.class_names, data.superclass_names, data.fine_to_coarse, data.source,
    )  # fmt: skip
    recipe = Recipe(epochs=1, batch_size=64, seed=3)
    weights = []
    for name in ("a", "b"):
        model = keras.models.load_model(
            train("cifar100-712868", small, tmp_path / name, recipe, False)
        )
        weights.append(model.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_augmentation_crops_and_flips_reproducibly(cifar_dir):
    split = cifar.load(cifar_dir, val_size=VAL_SIZE).test
    recipe = Recipe(batch_size=500, seed=5)
    images, labels = next(iter(train_dataset(split, recipe)))
    again, _ = next(iter(train_dataset(split, recipe)))
    plain, plain_labels = next(
        iter(train_dataset(split, Recipe(batch_size=500, seed=5, augment=False)))
    )
    assert images.dtype == "uint8" and images.shape == (500, 32, 32, 3)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, plain_labels)  # same shuffle, same order
    changed = (images.numpy() != plain.numpy()).any(axis=(1, 2, 3))
    assert changed.mean() > 0.8


def test_interrupted_run_resumes_where_it_stopped(cifar_tarball, tmp_path):
    """Kill a real training process after its first epoch, then --resume it."""
    run_dir = tmp_path / "runs" / "cifar100-712868"
    command = [
        sys.executable, "-m", "training", "train", "--model", "cifar100-712868",
        "--epochs", "3", "--batch-size", "64", "--no-augment", "--data-dir", str(cifar_tarball),
        "--val-size", str(VAL_SIZE), "--runs-dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "backup" / "training_metadata.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(history(run_dir)) < 3

    again = subprocess.run(command, env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently restarts

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert [row["epoch"] for row in history(run_dir)] == ["0", "1", "2"]
    best = best_checkpoint(run_dir)
    model = keras.models.load_model(best)
    steps_per_epoch = -(-(4000 - VAL_SIZE) // 64)
    # The optimizer state came back too: its step counter counts every epoch up to the
    # checkpoint's, those before the kill included (a fresh optimizer would count fewer).
    assert _epoch_of(best) > 1  # from after the kill, else the check below proves nothing
    assert int(model.optimizer.iterations) == _epoch_of(best) * steps_per_epoch
    assert not (run_dir / "backup").exists()


def test_resume_without_an_interrupted_run_is_an_error(cifar_dir, tmp_path):
    data = cifar.load(cifar_dir, val_size=VAL_SIZE)
    with pytest.raises(cifar.DataError, match="nothing to resume"):
        train("cifar100-712868", data, tmp_path / "run", Recipe(epochs=1), resume=True)


def test_resume_drops_history_rows_the_backup_does_not_cover(tmp_path):
    """Killed after an epoch's row was logged but before its backup: that epoch reruns."""
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_metadata.json").write_text('{"epoch": 2}')
    history_file = tmp_path / "history.csv"
    history_file.write_text("epoch,loss\n0,4.6\n1,4.1\n2,3.9\n")
    _forget_epochs_after_backup(history_file, tmp_path / "backup")
    assert history_file.read_text().split() == ["epoch,loss", "0,4.6", "1,4.1"]
