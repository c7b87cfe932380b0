"""What several commands share: the dataset, recipe, models folder and familiarity options,
and turning them into a dataset and a Recipe."""

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from training import data as cifar
from training import scores
from training.errors import RecipeError
from training.recipe import AUGMENTATIONS, OPTIMIZERS, SCHEDULES, Recipe

DEFAULT_RUNS_DIR = Path("runs")
DEFAULT_MODELS_DIR = Path("models")
DEFAULT_REPORTS_DIR = Path("reports")


@dataclass(frozen=True)
class Options:
    """Parent parsers a command's parser takes its options from."""

    data: argparse.ArgumentParser
    recipe: argparse.ArgumentParser
    models_dir: argparse.ArgumentParser
    familiarity: argparse.ArgumentParser


def options() -> Options:
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("CIFAR100_DIR") or None,
        help="a cifar-100-python folder or the .tar.gz (default: $CIFAR100_DIR, else download)",
    )
    data.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("CIFAR100_CACHE") or cifar.DEFAULT_CACHE_DIR),
        help="where the download is kept (default: $CIFAR100_CACHE or %(default)s)",
    )
    data.add_argument("--val-size", type=int, default=5000, help="held-out training images")
    data.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)

    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--epochs", type=int, default=Recipe.epochs)
    recipe.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    # Defaults come from Recipe, the one place the default recipe is written down.
    recipe.add_argument("--optimizer", choices=OPTIMIZERS, default=Recipe.optimizer)
    recipe.add_argument("--learning-rate", type=float, default=Recipe.learning_rate)
    recipe.add_argument("--schedule", choices=SCHEDULES, default=Recipe.schedule)
    recipe.add_argument("--weight-decay", type=float, default=Recipe.weight_decay)
    recipe.add_argument("--augment", choices=AUGMENTATIONS, default=Recipe.augment)
    recipe.add_argument(
        "--no-augment", dest="augment", action="store_const", const="none", help="--augment none"
    )
    recipe.add_argument("--conv-dropout", type=float, default=Recipe.conv_dropout)
    recipe.add_argument("--dense-dropout", type=float, default=Recipe.dense_dropout)
    recipe.add_argument("--label-smoothing", type=float, default=Recipe.label_smoothing)
    recipe.add_argument("--seed", type=int, default=Recipe.seed)
    recipe.add_argument(
        "--mixed-precision", action="store_true", help="float16 compute (GPU), float32 softmax"
    )
    recipe.add_argument(
        "--no-deterministic",
        dest="deterministic",
        action="store_false",
        help="allow nondeterministic kernels and XLA (faster on a GPU; runs no longer repeat "
        "exactly, nor resume to the weights of an uninterrupted run)",
    )
    recipe.add_argument(
        "--steps-per-execution",
        type=int,
        default=Recipe.steps_per_execution,
        help="training steps per tf.function call (default %(default)s; on a GPU, 8 to 32 "
        "keeps it busy between these small batches)",
    )
    recipe.add_argument(
        "--hold-out",
        dest="held_out_classes",
        type=class_list,
        default=Recipe.held_out_classes,
        metavar="CLASS,CLASS",
        help="leave these classes (comma-separated names) out of training and validation; "
        "their test images are scored apart, test accuracy is over the other classes",
    )
    # Not part of the recipe: how it is run. (train-export and ablate decide resuming
    # per run themselves, so only `train` takes --resume.)
    recipe.add_argument(
        "--gpus", type=int, default=1, help="train on N GPUs with MirroredStrategy (default 1)"
    )

    models_dir = argparse.ArgumentParser(add_help=False)
    models_dir.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)

    familiarity = argparse.ArgumentParser(add_help=False)
    familiarity.add_argument(
        "--familiarity-score",
        choices=scores.SCORES,
        default=scores.DEFAULT,
        help="the strangeness score the file's familiarity output calibrates (default "
        "%(default)s, chosen by `python -m training ood`)",
    )
    return Options(data, recipe, models_dir, familiarity)


def class_list(text: str) -> tuple[str, ...]:
    """--hold-out bed,bottle -> ("bed", "bottle"); the names are checked against the
    dataset's when training starts."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def recipe_of(args: argparse.Namespace) -> Recipe:
    try:
        return Recipe(**{field.name: getattr(args, field.name) for field in fields(Recipe)})
    except ValueError as err:
        raise RecipeError(str(err)) from None


def load_data(args: argparse.Namespace) -> cifar.Cifar100:
    data = cifar.load(args.data_dir, args.cache_dir, args.val_size)
    print(
        f"CIFAR-100 from {data.source}: {len(data.train)} train, {len(data.val)} validation, "
        f"{len(data.test)} test images",
        flush=True,
    )
    return data
