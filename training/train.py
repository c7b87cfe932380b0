"""Training recipe: the original architectures, trained better.

The original runs trained 48 epochs without augmentation. We keep the architectures and
the epoch count and add what reliably helps small CNNs on CIFAR: random crops of the
4-pixel reflect-padded image, horizontal flips, AdamW and a cosine learning-rate decay.

A run directory holds everything needed to continue or rebuild it:
    recipe.json                          the settings of the run
    cifar100-ID-{epoch:02d}-{val_accuracy:.2f}.keras   the best checkpoint (only that one)
    history.csv, logs/                   per-epoch metrics, TensorBoard logs
    backup/                              the last epoch, optimizer included, for --resume
"""

import csv
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import tensorflow as tf

from training.atomic import write_text
from training.data import Cifar100, DataError, Split
from training.models import build_model


@dataclass(frozen=True)
class Recipe:
    epochs: int = 48
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 5e-4
    augment: bool = True
    seed: int = 0

    def method(self) -> dict:
        """What the numbers above drive, in words, for the model card."""
        return {
            "optimizer": f"AdamW, weight decay {self.weight_decay}",
            "schedule": f"cosine decay from {self.learning_rate} to 0 over {self.epochs} epochs",
            "augmentation": "4px reflect pad + random 32x32 crop, horizontal flip"
            if self.augment
            else "none",
            "checkpoint_selection": "best validation accuracy",
        }


def train(model_id: str, data: Cifar100, run_dir: Path, recipe: Recipe, resume: bool) -> Path:
    """Train `model_id` into `run_dir` and return the best checkpoint."""
    run_dir = Path(run_dir)
    backup_dir = run_dir / "backup"
    if resume:
        if not backup_dir.exists():
            raise DataError(f"nothing to resume in {run_dir}: no interrupted run there")
        recipe = Recipe(**json.loads((run_dir / "recipe.json").read_text())["recipe"])
        _forget_epochs_after_backup(run_dir / "history.csv", backup_dir)
        print(f"Resuming {model_id} from {backup_dir} with its saved recipe", flush=True)
    else:
        if backup_dir.exists():
            raise DataError(
                f"{run_dir} holds an interrupted run: pass --resume to continue it, "
                "or delete the folder to start over"
            )
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        write_text(
            run_dir / "recipe.json",
            json.dumps(
                {"model_id": model_id, "recipe": asdict(recipe), "method": recipe.method()},
                indent=2,
            ),
        )

    gpus = tf.config.list_physical_devices("GPU")
    print(f"Training {model_id} on {'GPU: ' + gpus[0].name if gpus else 'CPU'}", flush=True)
    keras.utils.set_random_seed(recipe.seed)
    tf.config.experimental.enable_op_determinism()

    steps_per_epoch = math.ceil(len(data.train) / recipe.batch_size)
    model = build_model(model_id)
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=keras.optimizers.schedules.CosineDecay(
                recipe.learning_rate, decay_steps=recipe.epochs * steps_per_epoch
            ),
            weight_decay=recipe.weight_decay,
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
    )
    model.fit(
        train_dataset(data.train, recipe),
        validation_data=eval_dataset(data.val, recipe.batch_size),
        epochs=recipe.epochs,
        shuffle=False,  # the dataset shuffles itself, with the seed
        callbacks=[
            keras.callbacks.ModelCheckpoint(
                str(run_dir / f"{model_id}-{{epoch:02d}}-{{val_accuracy:.2f}}.keras"),
                monitor="val_accuracy",
                mode="max",
                save_best_only=True,
                # After a resume, only beat what the interrupted run already reached.
                initial_value_threshold=_best_so_far(run_dir / "history.csv"),
            ),
            KeepOnlyNewest(run_dir, f"{model_id}-*.keras"),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=resume),
            keras.callbacks.TensorBoard(str(run_dir / "logs")),
            # Last, so an epoch counts as done only once its checkpoint and row are written.
            keras.callbacks.BackupAndRestore(str(backup_dir)),
        ],
        verbose="auto" if sys.stdout.isatty() else 2,  # progress bars only on a terminal
    )
    return best_checkpoint(run_dir)


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a run: only improvements are saved, so the latest epoch's."""
    checkpoints = sorted(Path(run_dir).glob("cifar100-*-*-*.keras"), key=_epoch_of)
    if not checkpoints:
        raise DataError(f"no checkpoint in {run_dir}; train the model first")
    return checkpoints[-1]


def train_dataset(split: Split, recipe: Recipe) -> tf.data.Dataset:
    images = tf.data.Dataset.from_tensor_slices((split.images, split.fine))
    images = images.shuffle(len(split), seed=recipe.seed, reshuffle_each_iteration=True)
    if recipe.augment:
        # Stateless ops fed from a seeded stream: the same seed gives the same crops.
        seeds = tf.data.Dataset.random(seed=recipe.seed).batch(2)
        images = tf.data.Dataset.zip(images, seeds).map(
            _augment, num_parallel_calls=tf.data.AUTOTUNE
        )
    return images.batch(recipe.batch_size).prefetch(tf.data.AUTOTUNE)


def eval_dataset(split: Split, batch_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((split.images, split.fine)).batch(batch_size)


def _augment(example: tuple[tf.Tensor, tf.Tensor], seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    image, label = example
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="REFLECT")
    image = tf.image.stateless_random_crop(padded, [32, 32, 3], seed=seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
    return image, label


class KeepOnlyNewest(keras.callbacks.Callback):
    """Delete superseded best checkpoints, so a run keeps one file and not 48."""

    def __init__(self, run_dir: Path, pattern: str) -> None:
        super().__init__()
        self.run_dir, self.pattern = Path(run_dir), pattern

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for old in sorted(self.run_dir.glob(self.pattern), key=_epoch_of)[:-1]:
            old.unlink()


def _epoch_of(checkpoint: Path) -> int:
    return int(checkpoint.stem.split("-")[-2])


def _forget_epochs_after_backup(history: Path, backup_dir: Path) -> None:
    """Drop history rows of epochs the backup does not cover: they will be run again."""
    # BackupAndRestore records the number of finished epochs in this file.
    done = json.loads((backup_dir / "training_metadata.json").read_text())["epoch"]
    if not history.exists():
        return
    with history.open() as f:
        rows = list(csv.DictReader(f))
    kept = [row for row in rows if int(row["epoch"]) < done]
    if len(kept) < len(rows):
        with history.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)


def _best_so_far(history: Path) -> float | None:
    if not history.exists():
        return None
    with history.open() as f:
        scores = [float(row["val_accuracy"]) for row in csv.DictReader(f)]
    return max(scores, default=None)
