"""Training: the original architectures, trained better, resumable exactly.

The original runs trained 48 epochs without augmentation. We keep the architectures and
the epoch count; the rest (augmentation, optimizer, schedule, dropout rates, label
smoothing) is a `Recipe`, and its defaults are the ones `python -m training ablate`
measured to help (README, "Which recipe, and why").

A run directory holds everything needed to continue or rebuild it:
    recipe.json                          the settings of the run
    cifar100-ID-{epoch:02d}-{val_accuracy:.2f}.keras   the best checkpoint (only that one)
    history.csv, logs/                   per-epoch metrics, TensorBoard logs
    backup/                              the last epoch, optimizer included, for --resume

Every random choice of an epoch (the shuffle, the crops and flips, the dropout masks) is
drawn from (seed, epoch) and nothing else, so a run resumed after epoch k draws what an
uninterrupted run would have drawn: with op determinism on, it ends with the same weights.
"""

import contextlib
import csv
import json
import math
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

# Not exported under tf.config (only its enable_ twin is); Keras reads the same module.
from tensorflow.python.framework.config import disable_op_determinism

from contract.modelcard import NUM_CLASSES
from training.atomic import write_text
from training.data import Cifar100, Split, without_classes
from training.errors import RunError
from training.models import build_model
from training.recipe import Recipe


def train(
    model_id: str,
    data: Cifar100,
    run_dir: Path,
    recipe: Recipe,
    resume: bool,
    devices: int = 1,
) -> Path:
    """Train `model_id` into `run_dir` and return the best checkpoint.

    `devices` > 1 trains data-parallel with MirroredStrategy on that many GPUs (on a
    machine without GPUs: logical CPU devices, which is how the tests reach this path).
    """
    run_dir = Path(run_dir)
    backup_dir = run_dir / "backup"
    if resume:
        if not backup_dir.exists():
            raise RunError(f"nothing to resume in {run_dir}: no interrupted run there")
        recipe = saved_recipe(run_dir)
    # Before the folder is touched: a class name the dataset lacks is refused here.
    data = without_classes(data, recipe.held_out_classes)
    if recipe.held_out_classes:
        print(
            f"Holding out {', '.join(recipe.held_out_classes)}: {len(data.train)} training, "
            f"{len(data.val)} validation images left",
            flush=True,
        )
    if resume:
        first_epoch = forget_unfinished_epochs(run_dir)
        print(f"Resuming {model_id} after epoch {first_epoch} with its saved recipe", flush=True)
    else:
        if backup_dir.exists():
            raise RunError(
                f"{run_dir} holds an interrupted run: pass --resume to continue it, "
                "or delete the folder to start over"
            )
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        write_text(
            run_dir / "recipe.json",
            json.dumps(
                {
                    "model_id": model_id,
                    "recipe": recipe.record(),
                    "method": recipe.method(),
                    "choice": recipe.choice(),
                },
                indent=2,
            ),
        )
        first_epoch = 0

    strategy = distribution(devices)
    keras.utils.set_random_seed(recipe.seed)  # the initial weights
    # A process-wide switch, set both ways: a process may train runs of both kinds. Before
    # compile, which decides on XLA from it.
    if recipe.deterministic:
        tf.config.experimental.enable_op_determinism()
    else:
        disable_op_determinism()

    steps_per_epoch = math.ceil(len(data.train) / recipe.batch_size)
    # float16 compute, float32 variables; the model keeps its softmax in float32.
    policy = "mixed_float16" if recipe.mixed_precision else "float32"
    with precision(policy), strategy.scope():
        model = build_model(model_id, recipe.conv_dropout, recipe.dense_dropout)
        model.compile(
            optimizer=recipe.optimizer_instance(steps_per_epoch),
            # One-hot targets, because only the categorical loss smooths labels.
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
            metrics=[
                keras.metrics.CategoricalAccuracy(name="accuracy"),
                keras.metrics.TopKCategoricalAccuracy(5, name="top5"),
            ],
            steps_per_execution=recipe.steps_per_execution,
        )
    gpus = tf.config.list_physical_devices("GPU")
    print(
        f"Training {model_id} on {'GPU: ' + gpus[0].name if gpus else 'CPU'}"
        f" ({strategy.num_replicas_in_sync} replica(s); op determinism "
        f"{'on' if recipe.deterministic else 'off'}, XLA {'on' if model.jit_compile else 'off'}, "
        f"{recipe.steps_per_execution} step(s) per execution)",
        flush=True,
    )
    model.fit(
        # One dataset for all remaining epochs: each epoch's batches depend only on
        # (seed, epoch), so starting it at `first_epoch` is what an uninterrupted run sees.
        train_dataset(data.train, recipe, first_epoch),
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # the dataset shuffles itself, from (seed, epoch)
        validation_data=eval_dataset(data.val, recipe.batch_size),
        epochs=recipe.epochs,
        callbacks=[
            EpochSeeds(recipe.seed),
            keras.callbacks.ModelCheckpoint(
                str(run_dir / f"{model_id}-{{epoch:02d}}-{{val_accuracy:.2f}}.keras"),
                monitor="val_accuracy",
                mode="max",
                save_best_only=True,
                # After a resume, only beat what the interrupted run already reached.
                initial_value_threshold=_best_so_far(run_dir / "history.csv"),
            ),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume),
            keras.callbacks.TensorBoard(str(run_dir / "logs")),
            # An epoch counts as done once the backup records it: after its checkpoint and
            # its history row, so a resume never lacks either.
            keras.callbacks.BackupAndRestore(str(backup_dir)),
            # Only then may the superseded checkpoint go.
            KeepOnlyBest(run_dir),
        ],
        verbose="auto" if sys.stdout.isatty() else 2,  # progress bars only on a terminal
    )
    return best_checkpoint(run_dir)


def train_dataset(split: Split, recipe: Recipe, first_epoch: int = 0) -> tf.data.Dataset:
    """Batches of epochs `first_epoch` .. `recipe.epochs - 1`, each epoch a function of
    (seed, epoch): shuffled, then augmented a whole batch at a time."""
    images, labels = tf.constant(split.images), tf.constant(split.fine)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        seed = tf.stack([tf.constant(recipe.seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(tf.range(len(split)), seed=seed)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(recipe.batch_size)
        return batches.enumerate().map(
            lambda step, index: make_batch(index, tf.random.experimental.stateless_fold_in(
                seed, step)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )  # fmt: skip

    def make_batch(index: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.gather(images, index)
        if recipe.augment != "none":
            batch = augment_batch(batch, seed, recipe.augment)
        return batch, tf.one_hot(tf.gather(labels, index), NUM_CLASSES)

    epochs = tf.data.Dataset.range(first_epoch, recipe.epochs)
    return epochs.flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)


def augment_batch(images: tf.Tensor, seed: tf.Tensor, kind: str = "crop+flip") -> tf.Tensor:
    """4-pixel reflect pad and a random 32x32 crop, and/or a random horizontal flip, per
    image of a whole uint8 batch in a few vectorised ops (stateless: the seed fixes them).
    The crop and the flip draw from their own seeds, so "flip" flips what "crop+flip" does."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    n = tf.shape(images)[0]
    cropped = images if kind == "flip" else random_crops(images, crop_seed)
    if kind == "crop":
        return cropped
    flip = tf.random.stateless_uniform([n], flip_seed) < 0.5
    return tf.where(flip[:, None, None, None], tf.reverse(cropped, axis=[2]), cropped)


def random_crops(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    n = tf.shape(images)[0]
    padded = tf.pad(images, [[0, 0], [4, 4], [4, 4], [0, 0]], mode="REFLECT")
    corners = tf.random.stateless_uniform([n, 2], seed, minval=0, maxval=9, dtype=tf.int32)
    rows = corners[:, :1] + tf.range(32)  # [n, 32]: the rows each image keeps
    cols = corners[:, 1:] + tf.range(32)
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def eval_dataset(split: Split, batch_size: int) -> tf.data.Dataset:
    labels = tf.one_hot(split.fine, NUM_CLASSES)
    return tf.data.Dataset.from_tensor_slices((split.images, labels)).batch(batch_size)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 31-bit seed for one random stream of one epoch, from (seed, epoch) alone."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0]) & 0x7FFFFFFF


class EpochSeeds(keras.callbacks.Callback):
    """Reseed every random layer (dropout) at the start of each epoch from (seed, epoch).

    Keras keeps their generators' state outside the saved weights, so a resumed run would
    otherwise draw epoch 0's masks again."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        states = [v for v in self.model.variables if v.path.endswith("seed_generator_state")]
        for stream, state in enumerate(states):
            state.assign(np.array([epoch_seed(self.seed, epoch, stream), 0], state.dtype))


class KeepOnlyBest(keras.callbacks.Callback):
    """Delete superseded checkpoints, so a run keeps one file and not 48. Runs after the
    backup, so a kill at any point leaves the checkpoint the history calls best."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        best = best_checkpoint(self.run_dir)
        for other in _checkpoints(self.run_dir):
            if other != best:
                other.unlink()


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint of the epoch the history records as best.

    The history, not file names, decides: a kill can leave a checkpoint of an epoch that
    never finished, and a resumed run may write another one for that epoch."""
    run_dir = Path(run_dir)
    history = run_dir / "history.csv"
    rows = _history_rows(history)
    if not rows:
        raise RunError(f"no finished epoch in {run_dir}; train the model first")
    # ModelCheckpoint saves only strict improvements: the first best row has the file.
    best = max(rows, key=lambda row: float(row["val_accuracy"]))
    epoch = int(best["epoch"]) + 1  # file names count epochs from 1
    matches = [
        path
        for path in _checkpoints(run_dir)
        if _epoch_of(path) == epoch and path.stem.endswith(f"-{float(best['val_accuracy']):.2f}")
    ]
    if len(matches) != 1:
        raise RunError(
            f"{history} calls epoch {epoch} best, but {run_dir} has {len(matches)} checkpoints "
            "of it; retrain the model"
        )
    return matches[0]


def saved_recipe(run_dir: Path) -> Recipe:
    return Recipe(**json.loads((Path(run_dir) / "recipe.json").read_text())["recipe"])


def run_state(run_dir: Path, recipe: Recipe) -> str:
    """What `run_dir` holds for `recipe`: "finished", "interrupted" or "none" (nothing,
    or a finished run of another recipe, which training again replaces)."""
    run_dir = Path(run_dir)
    try:
        saved = saved_recipe(run_dir)
    except (OSError, ValueError, TypeError, KeyError):
        saved = None  # no run, or one from another version: nothing to continue
    if (run_dir / "backup").exists():
        if saved != recipe:
            raise RunError(
                f"{run_dir} holds an interrupted run of another recipe ({saved}): rerun with "
                "the same options to resume it, or delete the folder to start over"
            )
        return "interrupted"
    if saved == recipe:
        try:
            best_checkpoint(run_dir)
            return "finished"
        except RunError:
            pass
    return "none"


def epochs_done(backup_dir: Path) -> int:
    # BackupAndRestore records the number of finished epochs in this file.
    return json.loads((Path(backup_dir) / "training_metadata.json").read_text())["epoch"]


def forget_unfinished_epochs(run_dir: Path) -> int:
    """Drop history rows and checkpoints of epochs the backup does not cover (a kill came
    after they were written, before the backup): those epochs run again. Returns the
    number of epochs the backup covers."""
    run_dir = Path(run_dir)
    done = epochs_done(run_dir / "backup")
    history = run_dir / "history.csv"
    rows = _history_rows(history)
    kept = [row for row in rows if int(row["epoch"]) < done]
    if len(kept) < len(rows):
        with history.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)
    for path in _checkpoints(run_dir):
        if _epoch_of(path) > done:
            path.unlink()
    return done


def distribution(devices: int) -> tf.distribute.Strategy:
    """The default strategy for one device, else MirroredStrategy over `devices` GPUs
    (logical CPU devices where there is no GPU)."""
    if devices <= 1:
        return tf.distribute.get_strategy()
    found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    if len(found) < devices:
        raise RunError(f"asked for {devices} devices, but TensorFlow sees {len(found)}")
    return tf.distribute.MirroredStrategy([device.name for device in found[:devices]])


@contextlib.contextmanager
def precision(policy: str):
    """Keras's global dtype policy for a block; the previous one comes back after it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("cifar100-*-*-*.keras"))


def _epoch_of(checkpoint: Path) -> int:
    return int(checkpoint.stem.split("-")[-2])


def _history_rows(history: Path) -> list[dict]:
    if not history.exists():
        return []
    with history.open() as f:
        return list(csv.DictReader(f))


def _best_so_far(history: Path) -> float | None:
    scores = [float(row["val_accuracy"]) for row in _history_rows(history)]
    return max(scores, default=None)
