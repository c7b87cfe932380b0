"""The training loop on the synthetic dataset: it learns, it checkpoints, it resumes
exactly where it stopped, and a seed makes it repeatable, interrupted or not."""

import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.conftest import SMALL_VAL_SIZE, VAL_SIZE
from tests.interrupt import kill_when
from training import data as cifar
from training.errors import RunError
from training.processes import run_python
from training.recipe import Recipe
from training.train import (
    _epoch_of,
    best_checkpoint,
    forget_unfinished_epochs,
    train,
    train_dataset,
)

ROOT = Path(__file__).resolve().parent.parent


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
    assert len(per_class) == 100 and len(evaluation["per_superclass_of_top_class_accuracy"]) == 20
    # Balanced test set: the mean of per-class accuracies is the top-1 accuracy.
    assert np.mean(per_class) == pytest.approx(evaluation["top1_accuracy"])
    assert evaluation["top1_accuracy"] <= evaluation["top5_accuracy"]
    assert evaluation["top1_accuracy"] <= evaluation["superclass_of_top_class_accuracy"]


def first_256_training_images(cifar_dir: Path) -> cifar.Cifar100:
    """The dataset with only its first 256 training images: an epoch in seconds."""
    data = cifar.load(cifar_dir, val_size=VAL_SIZE)
    return cifar.Cifar100(
        data.train.take(np.arange(256)), data.val, data.test,
        data.class_names, data.superclass_names, data.fine_to_coarse, data.source,
    )  # fmt: skip


def test_same_seed_same_weights(cifar_dir, tmp_path):
    small = first_256_training_images(cifar_dir)
    recipe = Recipe(epochs=1, batch_size=64, seed=3)
    weights = []
    for name in ("a", "b"):
        model = keras.models.load_model(
            train("cifar100-712868", small, tmp_path / name, recipe, False)
        )
        weights.append(model.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_speed_switches_reach_tensorflow_and_keras_and_are_saved(cifar_dir, tmp_path, monkeypatch):
    """--no-deterministic turns op determinism off while the run compiles and trains (so
    Keras may choose XLA on a GPU), --steps-per-execution reaches model.compile, every step
    is still taken, and both are part of the run's recipe.json and method; the default
    recipe turns determinism back on in the same process."""
    from tensorflow.python.framework.config import is_op_determinism_enabled

    small = first_256_training_images(cifar_dir)
    compiled, fitted = [], []
    real_compile, real_fit = keras.Model.compile, keras.Model.fit

    def compile(self, *args, **kwargs):
        compiled.append((kwargs.get("steps_per_execution"), is_op_determinism_enabled()))
        return real_compile(self, *args, **kwargs)

    def fit(self, *args, **kwargs):
        fitted.append(is_op_determinism_enabled())
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "compile", compile)
    monkeypatch.setattr(keras.Model, "fit", fit)
    fast = Recipe(epochs=1, batch_size=64, deterministic=False, steps_per_execution=3)
    best = train("cifar100-712868", small, tmp_path / "fast", fast, False)
    assert (compiled, fitted) == ([(3, False)], [False])
    saved = json.loads((tmp_path / "fast" / "recipe.json").read_text())
    assert saved["recipe"]["deterministic"] is False
    assert saved["recipe"]["steps_per_execution"] == 3
    assert Recipe(**saved["recipe"]) == fast
    assert "nondeterministic" in saved["method"]["execution"]
    assert "3 step(s) per execution" in saved["method"]["execution"]
    differs = saved["choice"]["differs_from_default"]
    assert differs["deterministic"] is False and differs["steps_per_execution"] == 3

    compiled.clear()
    fitted.clear()
    train("cifar100-712868", small, tmp_path / "exact", Recipe(epochs=1, batch_size=64), False)
    assert (compiled, fitted) == ([(1, True)], [True])
    saved = json.loads((tmp_path / "exact" / "recipe.json").read_text())["recipe"]
    assert (saved["deterministic"], saved["steps_per_execution"]) == (True, 1)

    monkeypatch.undo()  # Keras does not compile a loaded model whose compile looks custom
    # 256 images in batches of 64 at 3 steps per call: 3 + 1, none skipped.
    assert int(keras.models.load_model(best).optimizer.iterations) == 4


def test_speed_switches_on_the_command_line():
    from training.__main__ import parser
    from training.commands.options import recipe_of
    from training.errors import RecipeError

    def recipe(*argv):
        return recipe_of(parser().parse_args(argv))

    model = ["--model", "cifar100-712868"]
    assert recipe("train", *model) == Recipe()
    assert Recipe().deterministic is True and Recipe().steps_per_execution == 1
    switches = ["--no-deterministic", "--steps-per-execution", "16"]
    for command in (["train", *model], ["train-export"], ["ablate", *model]):
        assert recipe(*command, *switches) == Recipe(deterministic=False, steps_per_execution=16)
    with pytest.raises(RecipeError, match="steps per execution"):
        recipe("train", *model, "--steps-per-execution", "0")


def test_augmentation_crops_and_flips_reproducibly(cifar_dir):
    split = cifar.load(cifar_dir, val_size=VAL_SIZE).test
    recipe = Recipe(batch_size=500, seed=5)
    images, labels = next(iter(train_dataset(split, recipe)))
    again, _ = next(iter(train_dataset(split, recipe)))
    plain, plain_labels = next(
        iter(train_dataset(split, Recipe(batch_size=500, seed=5, augment="none")))
    )
    assert images.dtype == "uint8" and images.shape == (500, 32, 32, 3)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, plain_labels)  # same shuffle, same order
    changed = (images.numpy() != plain.numpy()).any(axis=(1, 2, 3))
    assert changed.mean() > 0.8


def test_flips_only_and_crops_only_do_what_they_say(cifar_dir):
    """ "flip" mirrors some images and changes nothing else; "crop+flip" is "crop" with the
    same images mirrored (each draws from its own seed)."""
    split = cifar.load(cifar_dir, val_size=VAL_SIZE).test

    def first_batch(augment):
        recipe = Recipe(batch_size=500, seed=5, augment=augment)
        return next(iter(train_dataset(split, recipe)))[0].numpy()

    plain, flipped = first_batch("none"), first_batch("flip")
    cropped, both = first_batch("crop"), first_batch("crop+flip")
    mirrored = (flipped == plain[:, :, ::-1]).all(axis=(1, 2, 3))
    assert ((flipped == plain).all(axis=(1, 2, 3)) | mirrored).all()
    assert 0.3 < mirrored.mean() < 0.7
    assert (
        (both == cropped).all(axis=(1, 2, 3)) | (both == cropped[:, :, ::-1]).all(axis=(1, 2, 3))
    ).all()
    assert (cropped != plain).any(axis=(1, 2, 3)).mean() > 0.8


def test_epochs_differ_and_depend_only_on_seed_and_epoch(cifar_dir):
    """Epoch 1 as the second epoch of a run is epoch 1 of a run resumed there."""
    split = cifar.load(cifar_dir, val_size=VAL_SIZE).test
    recipe = Recipe(epochs=2, batch_size=500, seed=5)
    epoch0, epoch1 = [images.numpy() for images, _ in train_dataset(split, recipe)]
    (resumed,) = [images.numpy() for images, _ in train_dataset(split, recipe, first_epoch=1)]
    np.testing.assert_array_equal(epoch1, resumed)
    assert (epoch0 != epoch1).any(axis=(1, 2, 3)).mean() > 0.9  # a new shuffle and new crops


def test_killed_and_resumed_run_ends_as_an_uninterrupted_one(small_tarball, tmp_path):
    """Kill a real training process after its first epoch, then --resume it: same history
    to the last digit and bit-identical weights as a run that was never interrupted."""

    def command(runs):
        return [
            sys.executable, "-m", "training", "train", "--model", "cifar100-712868",
            "--epochs", "3", "--batch-size", "32", "--data-dir", str(small_tarball),
            "--val-size", str(SMALL_VAL_SIZE), "--runs-dir", str(runs),
        ]  # fmt: skip

    run_dir = tmp_path / "killed" / "cifar100-712868"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ready = (run_dir / "backup" / "training_metadata.json").exists
    kill_when(command(run_dir.parent), ready, "the first epoch", env=env)
    assert len(history(run_dir)) < 3

    again = subprocess.run(command(run_dir.parent), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently restarts

    resumed = subprocess.run(
        [*command(run_dir.parent), "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not (run_dir / "backup").exists()
    whole = subprocess.run(command(tmp_path / "whole"), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr

    whole_dir = tmp_path / "whole" / "cifar100-712868"
    assert [row["epoch"] for row in history(run_dir)] == ["0", "1", "2"]
    assert history(run_dir) == history(whole_dir)  # every metric of every epoch
    best, whole_best = best_checkpoint(run_dir), best_checkpoint(whole_dir)
    assert best.name == whole_best.name
    model, whole_model = keras.models.load_model(best), keras.models.load_model(whole_best)
    for a, b in zip(model.get_weights(), whole_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # The optimizer state came back too: its step counter counts every epoch up to the
    # checkpoint's, those before the kill included.
    steps_per_epoch = -(-(800 - SMALL_VAL_SIZE) // 32)
    assert int(model.optimizer.iterations) == _epoch_of(best) * steps_per_epoch
    for a, b in zip(model.optimizer.variables, whole_model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_without_an_interrupted_run_is_an_error(cifar_dir, tmp_path):
    data = cifar.load(cifar_dir, val_size=VAL_SIZE)
    with pytest.raises(RunError, match="nothing to resume"):
        train("cifar100-712868", data, tmp_path / "run", Recipe(epochs=1), resume=True)


def checkpoint(run_dir, epoch, accuracy):
    path = run_dir / f"cifar100-712868-{epoch:02d}-{accuracy:.2f}.keras"
    path.write_bytes(b"a checkpoint")
    return path


def test_resume_forgets_epochs_the_backup_does_not_cover(tmp_path):
    """Killed after epoch 3's checkpoint and history row, before its backup: epoch 3 runs
    again, so its row and checkpoint go; the backup's epochs stay."""
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_metadata.json").write_text('{"epoch": 2}')
    (tmp_path / "history.csv").write_text("epoch,val_accuracy\n0,0.30\n1,0.40\n2,0.45\n")
    best = checkpoint(tmp_path, 2, 0.40)
    unfinished = checkpoint(tmp_path, 3, 0.45)
    assert forget_unfinished_epochs(tmp_path) == 2
    assert (tmp_path / "history.csv").read_text().split() == [
        "epoch,val_accuracy", "0,0.30", "1,0.40",
    ]  # fmt: skip
    assert not unfinished.exists()
    assert best_checkpoint(tmp_path) == best


def test_best_checkpoint_is_the_one_the_history_records(tmp_path):
    """Two checkpoints of epoch 3 (one from before a kill): the history decides, not the
    file names, which would pick the later name."""
    (tmp_path / "history.csv").write_text("epoch,val_accuracy\n0,0.30\n1,0.40\n2,0.46\n3,0.44\n")
    checkpoint(tmp_path, 2, 0.40)
    recorded = checkpoint(tmp_path, 3, 0.46)
    checkpoint(tmp_path, 3, 0.47)
    assert best_checkpoint(tmp_path) == recorded
    recorded.unlink()
    with pytest.raises(RunError, match="retrain"):
        best_checkpoint(tmp_path)


def test_mixed_precision_on_two_devices_trains_and_exports(small_tarball, tmp_path):
    """The multi-GPU path (MirroredStrategy) on two logical CPU devices, with mixed
    precision: it trains, and the float32 export passes parity."""
    script = f"""
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from training.__main__ import main
common = ["--data-dir", {str(small_tarball)!r}, "--val-size", "{SMALL_VAL_SIZE}",
          "--runs-dir", {str(tmp_path / "runs")!r}]
assert main(["train", "--model", "cifar100-712868", "--epochs", "1", "--batch-size", "32",
             "--gpus", "2", "--mixed-precision", *common]) == 0
sys.exit(main(["export", "--model", "cifar100-712868",
               "--models-dir", {str(tmp_path / "models")!r}, *common]))
"""
    done = run_python("-c", script)
    assert "(2 replica(s); op determinism on" in done.stdout
    assert "Parity on" in done.stdout
    recipe = json.loads((tmp_path / "runs" / "cifar100-712868" / "recipe.json").read_text())
    assert recipe["recipe"]["mixed_precision"] is True
    assert (tmp_path / "models" / "cifar100-712868.onnx").exists()


def test_gpu_check_stops_with_a_message_without_a_gpu(tmp_path):
    """`make gpu-check` where no NVIDIA driver is found (here: none on PATH), by either
    entry: the module, and the training image's `python -m training gpu-check`."""
    from training import gpu_check
    from training.models import MODEL_IDS

    assert gpu_check.MODEL_IDS == MODEL_IDS
    env = {**os.environ, "PATH": str(tmp_path)}
    for command in (["training.gpu_check"], ["training", "gpu-check"]):
        done = run_python("-m", *command, env=env, check=False)
        assert done.returncode == 1, (command, done.stderr[-2000:])
        assert "needs an NVIDIA GPU; nothing was run" in done.stdout


def test_make_gpu_check_asks_the_driver_before_installing_anything(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver: `make gpu-check` would run the check")
    venvs = tmp_path / "gpu-venvs"
    done = subprocess.run(
        ["make", "--no-print-directory", "gpu-check", f"GPU_VENVS={venvs}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "needs an NVIDIA GPU; nothing was run" in done.stdout
    assert not venvs.exists()


def test_gpu_check_steps_run_end_to_end_on_the_cpu(tmp_path):
    """Every step `make gpu-check` takes, with --device cpu: the dataset from training/
    (not tests/), training and export each in a process of their own, the service
    started as `python -m service` from --service-python, its /models providers checked,
    images/s measured, and TensorFlow never loaded by the process that outlives the
    service. What only a GPU shows is that CUDA is used, and how fast."""
    from training.models import MODEL_IDS

    done = run_python(
        "-m", "training", "gpu-check", "--device", "cpu", "--keep", str(tmp_path),
        "--train-per-class", "2", "--serve-seconds", "1", "--service-python", sys.executable,
        timeout=1200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for model_id in MODEL_IDS:
        for variant in ("default recipe", "speed switches --no-deterministic"):
            assert re.search(
                rf"gpu-check: trained {model_id} \({variant}[^)]*\): [\d,]+ images/s in epoch 2 ",
                out,
            ), variant
        assert re.search(rf"gpu-check: served {model_id}: [\d,]+ images/s", out)
        assert (tmp_path / "models" / f"{model_id}.onnx").exists()
    (providers,) = re.findall(r"^gpu-check: /models providers: (\{.*\})$", out, re.M)
    assert ast.literal_eval(providers) == dict.fromkeys(MODEL_IDS, "CPUExecutionProvider")
    assert out.rstrip().endswith("gpu-check: passed")


# Which packages each may not import, at any depth (inside functions too): the contract is
# what the others share and imports none of them; training and the service meet only in the
# contract; neither runs in an image that holds tests/ or bench/ (the training image, the
# service's), and the service never loads TensorFlow.
FORBIDDEN_IMPORTS = {
    "contract": {"training", "service", "score", "bench", "tests", "tensorflow", "keras"},
    "training": {"service", "score", "bench", "tests"},
    "service": {"training", "score", "bench", "tests", "tensorflow", "keras"},
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_packages_import_only_downwards(package):
    for path in sorted(ROOT.glob(f"{package}/**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_IMPORTS[package], (path, name)
