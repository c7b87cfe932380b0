"""Which parts of the recipe earn their place: train variants of it, several seeds each,
and write one table of what each reached.

Each variant is the base recipe (the command line's) with a few settings changed. Every
(variant, seed) is an ordinary run folder made by `train`, scored like `evaluate` scores,
under runs/ablation-ID/VARIANT/seed-N/, so an interrupted ablation continues where it
stopped and finished runs are never trained twice. Several processes may share the work:
each run is claimed with a lock file beside its folder, a run claimed by another process
is left to it, and any of them writes the table from every result present.

Accuracy is top-1 on the classes *present*: those with at least a tenth of the largest
class's training images. On CIFAR-100 that is all 100; on the real-photo stand-in set
(10 real classes, filler elsewhere) it is the 10 real ones. The variant to keep is the
one with the best validation mean: test numbers are reported, never used to choose.
"""

import contextlib
import fcntl
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np

from training.atomic import write_text
from training.data import Cifar100, Split, without_classes
from training.evaluate import compute_metrics
from training.recipe import Recipe
from training.train import best_checkpoint, run_state, train

# name -> (what changes, in words; the settings changed from the base recipe)
VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("the base recipe as is", {}),
    "no-augment": ("no augmentation", {"augment": "none"}),
    "flip": ("flips only", {"augment": "flip"}),
    "crop": ("crops only", {"augment": "crop"}),
    "light-dropout": ("dropout 0.1 / 0.25", {"conv_dropout": 0.1, "dense_dropout": 0.25}),
    "no-dropout": ("no dropout", {"conv_dropout": 0.0, "dense_dropout": 0.0}),
    "seed-dropout": (
        "dropout 0.25 / 0.5 (the recipe before the ablation)",
        {"conv_dropout": 0.25, "dense_dropout": 0.5},
    ),
    "lr-3e-3": ("learning rate 3e-3", {"learning_rate": 3e-3}),
    "wd-5e-2": ("weight decay 0.05", {"weight_decay": 0.05}),
    "smoothing": ("label smoothing 0.1", {"label_smoothing": 0.1}),
    "adam-2017": (  # the likely setting of the seed's runs, whatever the base is
        "plain Adam, constant rate, no augmentation, dropout 0.25 / 0.5",
        {
            "optimizer": "adam",
            "schedule": "constant",
            "augment": "none",
            "conv_dropout": 0.25,
            "dense_dropout": 0.5,
            "label_smoothing": 0.0,
        },
    ),
}
RESULT = "result.json"


def run(
    model_id: str,
    data: Cifar100,
    out_dir: Path,
    base: Recipe,
    variants: list[str],
    seeds: range,
    devices: int = 1,
) -> str:
    """Train and score every (variant, seed) not already done; write and return the table."""
    out_dir = Path(out_dir)
    # Held-out classes are never trained on: scored on the others, like `evaluate` does.
    present = present_classes(without_classes(data, base.held_out_classes).train)
    for seed in seeds:  # every variant's first seed first: a cut-short ablation still compares
        for name in variants:
            recipe = replace(base, **VARIANTS[name][1], seed=seed)
            if name != "base" and recipe == replace(base, seed=seed):
                print(f"{name} is the base recipe here; not trained twice", flush=True)
                continue
            run_dir = out_dir / name / f"seed-{seed}"
            with claimed(run_dir) as mine:
                if mine:
                    result_of(model_id, data, run_dir, recipe, present, devices)
                else:
                    print(f"{run_dir}: claimed by another process; left to it", flush=True)
    return write_table(out_dir, model_id, base, present, data.source)


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[bool]:
    """Hold run_dir for this process while it trains and scores there; False if another
    process holds it. The lock is the kernel's (flock): it dies with its process, so a
    killed ablation leaves nothing to clean up."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_name(run_dir.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True  # closing the file releases the lock


def present_classes(split: Split) -> list[int]:
    counts = np.bincount(split.fine, minlength=100)
    return [int(c) for c in np.flatnonzero(counts >= counts.max() / 10)]


def result_of(
    model_id: str, data: Cifar100, run_dir: Path, recipe: Recipe, present: list[int], devices: int
) -> dict:
    """The run's result.json if it is for this recipe, else train (or resume) and score."""
    saved = run_dir / RESULT
    if saved.exists() and (result := json.loads(saved.read_text()))["recipe"] == recipe.record():
        return result
    state = run_state(run_dir, recipe)
    started = time.monotonic()
    if state != "finished":
        print(f"{run_dir}: training ({state if state != 'none' else 'new'})", flush=True)
        train(model_id, data, run_dir, recipe, resume=state == "interrupted", devices=devices)
    seconds = time.monotonic() - started
    checkpoint = best_checkpoint(run_dir)
    model = keras.models.load_model(checkpoint)
    rows = (run_dir / "history.csv").read_text().splitlines()
    last = dict(zip(rows[0].split(","), rows[-1].split(","), strict=True))
    result = {
        "recipe": recipe.record(),
        "checkpoint": checkpoint.name,
        "val_accuracy": accuracy(model, data.val, present, data),
        "test_accuracy": accuracy(model, data.test, present, data),
        "last_epoch_train_accuracy": float(last["accuracy"]),  # with dropout and augmentation
        "train_seconds": round(seconds, 1),  # 0 when it was trained before this result
    }
    write_text(saved, json.dumps(result, indent=2))
    return result


def accuracy(model: keras.Model, split: Split, present: list[int], data: Cifar100) -> float:
    """Top-1 over the split's images of the present classes (argmax over all 100)."""
    keep = np.isin(split.fine, present)
    probabilities = model.predict(split.images[keep], batch_size=512, verbose=0)
    metrics = compute_metrics(
        probabilities,
        split.fine[keep],
        data.fine_to_coarse,
        data.class_names,
        data.superclass_names,
    )
    return metrics["top1_accuracy"]


def write_table(out_dir: Path, model_id: str, base: Recipe, present: list[int], source) -> str:
    """ablation.md and ablation.json from every result under out_dir whose recipe differs
    from `base` only as its variant says (and by seed)."""
    rows = []
    for name, (words, changes) in VARIANTS.items():
        expected = replace(base, **changes, seed=0).record() | {"seed": None}
        results = [
            result
            for path in sorted((out_dir / name).glob(f"seed-*/{RESULT}"))
            if ((result := json.loads(path.read_text()))["recipe"] | {"seed": None}) == expected
        ]
        if results:
            rows.append(summary(name, words, results))
    best = max(rows, key=lambda row: row["val_mean"])["variant"] if rows else None
    table = {
        "model_id": model_id,
        "data": str(source),
        "present_classes": present,
        "base_recipe": base.record() | {"seed": None},
        "chosen_by_validation": best,
        "rows": rows,
    }
    write_text(out_dir / "ablation.json", json.dumps(table, indent=2))
    markdown = markdown_of(table)
    write_text(out_dir / "ablation.md", markdown)
    return markdown


def summary(name: str, words: str, results: list[dict]) -> dict:
    def mean_sd(key: str) -> tuple[float, float | None]:
        values = [result[key] for result in results]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    val_mean, val_sd = mean_sd("val_accuracy")
    test_mean, test_sd = mean_sd("test_accuracy")
    times = [result["train_seconds"] for result in results if result["train_seconds"] > 0]
    return {
        "variant": name,
        "changes": words,
        "seeds": sorted(result["recipe"]["seed"] for result in results),
        "val_mean": val_mean,
        "val_sd": val_sd,
        "test_mean": test_mean,
        "test_sd": test_sd,
        "train_accuracy_mean": statistics.fmean(r["last_epoch_train_accuracy"] for r in results),
        "minutes_per_run": statistics.fmean(times) / 60 if times else None,
    }


def markdown_of(table: dict) -> str:
    base = ", ".join(f"{k}={v}" for k, v in table["base_recipe"].items() if k != "seed")
    lines = [
        f"# Ablation of the recipe: {table['model_id']}",
        "",
        f"Data: {table['data']}. Top-1 on the {len(table['present_classes'])} classes present "
        "(mean ± sample standard deviation over seeds; argmax over all 100 classes).",
        f"Base recipe: {base}.",
        "",
        "| variant | changes | seeds | val top-1 | test top-1 "
        "| train acc, last epoch (as trained) | wall min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        mark = " **(best val)**" if row["variant"] == table["chosen_by_validation"] else ""
        minutes = f"{row['minutes_per_run']:.1f}" if row["minutes_per_run"] else "-"
        lines.append(
            f"| {row['variant']}{mark} | {row['changes']} | {len(row['seeds'])} "
            f"| {_spread(row['val_mean'], row['val_sd'])} "
            f"| {_spread(row['test_mean'], row['test_sd'])} "
            f"| {row['train_accuracy_mean']:.3f} | {minutes} |"
        )
    return "\n".join(lines) + "\n"


def _spread(mean: float, sd: float | None) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None else f"{mean:.3f} (one seed)"
