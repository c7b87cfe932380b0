"""`python -m training ablate` on the small synthetic set: it trains each (variant, seed)
with the real training loop, writes the table, and a rerun trains nothing again."""

import fcntl
import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from tests.conftest import SMALL_VAL_SIZE
from training.__main__ import main
from training.ablation import RESULT, VARIANTS, present_classes, write_table
from training.data import Split
from training.recipe import Recipe


def test_ablate_writes_the_table_and_reuses_finished_runs(small_tarball, tmp_path, capsys):
    argv = [
        "ablate", "--model", "cifar100-712868", "--variants", "base,flip", "--seeds", "2",
        "--epochs", "1", "--batch-size", "64", "--data-dir", str(small_tarball),
        "--val-size", str(SMALL_VAL_SIZE), "--runs-dir", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "ablation-cifar100-712868"
    table = json.loads((out / "ablation.json").read_text())
    assert [row["variant"] for row in table["rows"]] == ["base", "flip"]
    assert table["present_classes"] == list(range(100))  # every synthetic class is present
    chosen = next(row for row in table["rows"] if row["variant"] == table["chosen_by_validation"])
    assert chosen["val_mean"] == max(row["val_mean"] for row in table["rows"])
    for row in table["rows"]:
        assert row["seeds"] == [0, 1]
        assert 0 <= row["val_mean"] <= 1 and 0 <= row["test_mean"] <= 1
        assert row["val_sd"] >= 0 and row["minutes_per_run"] > 0  # two seeds: a spread
    flip = json.loads((out / "flip" / "seed-1" / "result.json").read_text())
    assert flip["recipe"]["augment"] == "flip" and flip["recipe"]["seed"] == 1
    # Each run is an ordinary run folder: its recipe.json is the one in the result.
    saved = json.loads((out / "flip" / "seed-1" / "recipe.json").read_text())
    assert saved["recipe"] == flip["recipe"]
    assert saved["method"]["augmentation"] == "horizontal flip"
    default = Recipe().record()  # as recipe.json holds it: lists, not tuples
    assert saved["choice"]["differs_from_default"] == {
        k: v for k, v in flip["recipe"].items() if k not in ("epochs", "seed") and default[k] != v
    }
    assert saved["choice"]["differs_from_default"]["batch_size"] == 64
    assert "README" in saved["choice"]["evidence"]
    markdown = (out / "ablation.md").read_text()
    assert "| base" in markdown and "| flip" in markdown and "(best val)" in markdown

    # Rerun: nothing trains again, results stay as they were.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.keras")}
    capsys.readouterr()
    assert main(argv) == 0
    assert "training" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.keras")} == stamps
    assert json.loads((out / "ablation.json").read_text())["rows"] == table["rows"]


def test_the_variant_kept_is_the_best_by_validation_mean_never_by_test(tmp_path):
    """Results where every criterion but the right one picks another variant: the best
    test mean (no-augment), the best single validation seed (crop), the best training
    accuracy (base). The table keeps flip, the best validation mean, and says so."""
    base = Recipe(epochs=1, batch_size=64)
    scores = {  # variant -> per seed: (val, test, last-epoch train accuracy)
        "base": [(0.30, 0.30, 0.99), (0.30, 0.30, 0.99)],
        "no-augment": [(0.35, 0.70, 0.50), (0.35, 0.70, 0.50)],
        "flip": [(0.41, 0.20, 0.50), (0.39, 0.20, 0.50)],
        "crop": [(0.60, 0.40, 0.50), (0.10, 0.40, 0.50)],
    }
    for name, seeds in scores.items():
        for seed, (val, test, train) in enumerate(seeds):
            recipe = replace(base, **VARIANTS[name][1], seed=seed)
            folder = tmp_path / name / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / RESULT).write_text(json.dumps({
                "recipe": asdict(recipe), "checkpoint": "best.keras", "val_accuracy": val,
                "test_accuracy": test, "last_epoch_train_accuracy": train, "train_seconds": 60,
            }))  # fmt: skip
    markdown = write_table(tmp_path, "cifar100-712868", base, list(range(100)), "synthetic")
    table = json.loads((tmp_path / "ablation.json").read_text())
    assert table["chosen_by_validation"] == "flip"
    means = {row["variant"]: (row["val_mean"], row["test_mean"]) for row in table["rows"]}
    assert means["flip"] == pytest.approx((0.40, 0.20))
    assert means["no-augment"] == pytest.approx((0.35, 0.70))
    assert markdown == (tmp_path / "ablation.md").read_text()
    marked = [line for line in markdown.splitlines() if "(best val)" in line]
    assert len(marked) == 1 and marked[0].startswith("| flip **(best val)** |")


def test_a_run_claimed_by_another_process_is_left_to_it(small_tarball, tmp_path, capsys):
    """Two ablations over the same variants split the work instead of training one run
    twice at once (and one resuming the other's half-written checkpoints)."""
    argv = [
        "ablate", "--model", "cifar100-712868", "--variants", "base,flip", "--seeds", "1",
        "--epochs", "1", "--batch-size", "64", "--data-dir", str(small_tarball),
        "--val-size", str(SMALL_VAL_SIZE), "--runs-dir", str(tmp_path),
    ]  # fmt: skip
    out = tmp_path / "ablation-cifar100-712868"
    (out / "base").mkdir(parents=True)
    with open(out / "base" / "seed-0.lock", "w") as other:  # another process at work
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(argv) == 0
    assert "base/seed-0: claimed by another process" in capsys.readouterr().out
    assert not (out / "base" / "seed-0").exists()
    table = json.loads((out / "ablation.json").read_text())
    assert [row["variant"] for row in table["rows"]] == ["flip"]
    assert main(argv) == 0  # released: now this process trains it
    table = json.loads((out / "ablation.json").read_text())
    assert [row["variant"] for row in table["rows"]] == ["base", "flip"]


def test_ablate_refuses_an_unknown_variant(small_tarball, tmp_path, capsys):
    argv = ["ablate", "--model", "cifar100-712868", "--variants", "base,mixup", "--epochs", "1"]
    argv += ["--data-dir", str(small_tarball), "--val-size", str(SMALL_VAL_SIZE)]
    assert main([*argv, "--runs-dir", str(tmp_path)]) == 2
    assert "unknown variant(s) mixup" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_present_classes_are_those_with_real_counts():
    """The real-photo set's layout: 10 classes of 450, 90 filler classes of 9."""
    fine = np.concatenate([np.repeat(np.arange(10), 450), np.repeat(np.arange(10, 100), 9)])
    split = Split(np.zeros((len(fine), 32, 32, 3), np.uint8), fine, fine // 5)
    assert present_classes(split) == list(range(10))


def test_a_recipe_that_cannot_work_is_refused_before_training(small_tarball, tmp_path, capsys):
    argv = ["train", "--model", "cifar100-712868", "--epochs", "1", "--conv-dropout", "1.5"]
    argv += ["--data-dir", str(small_tarball), "--val-size", str(SMALL_VAL_SIZE)]
    assert main([*argv, "--runs-dir", str(tmp_path)]) == 2
    assert "conv_dropout must be in [0, 1), not 1.5" in capsys.readouterr().err
    assert not (tmp_path / "cifar100-712868").exists()
