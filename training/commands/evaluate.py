"""python -m training evaluate: the best checkpoint's test-set metrics (kept beside it in
evaluation.json, which export reuses while the checkpoint is the same)."""

import argparse
import hashlib
import json
from pathlib import Path

import keras

from training import data as cifar
from training.atomic import write_text
from training.commands.options import Options
from training.evaluate import evaluate_test_set
from training.models import MODEL_IDS
from training.train import best_checkpoint, saved_recipe


def add(commands: argparse._SubParsersAction, options: Options) -> None:
    parser = commands.add_parser("evaluate", parents=[options.data],
                                 help="score the best checkpoint")  # fmt: skip
    parser.add_argument("--model", required=True, choices=MODEL_IDS)
    parser.set_defaults(command=run)


def run(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    checkpoint = best_checkpoint(args.runs_dir / args.model)
    print_metrics(evaluation_of(checkpoint, data))


def evaluation_of(checkpoint: Path, data: cifar.Cifar100) -> dict:
    """The checkpoint's test-set metrics, from evaluation.json when it is for this checkpoint:
    the same content (a retrained run can write a file of the same name), not the name."""
    saved = checkpoint.parent / "evaluation.json"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    if (
        saved.exists()
        and (result := json.loads(saved.read_text())).get("checkpoint_sha256") == digest
    ):
        return result
    result = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": digest,
        **evaluate_model(
            keras.models.load_model(checkpoint),
            data,
            saved_recipe(checkpoint.parent).held_out_classes,
        ),
    }
    write_text(saved, json.dumps(result, indent=2))
    print(f"Wrote {saved}")
    return result


def evaluate_model(
    model: keras.Model, data: cifar.Cifar100, held_out: tuple[str, ...] = ()
) -> dict:
    return evaluate_test_set(
        lambda images: model.predict(images, batch_size=512, verbose=0), data, held_out
    )


def print_metrics(evaluation: dict) -> None:
    print(
        f"top-1 {evaluation['top1_accuracy']:.4f}  top-5 {evaluation['top5_accuracy']:.4f}  "
        f"superclass of top class {evaluation['superclass_of_top_class_accuracy']:.4f}  "
        f"summed superclass {evaluation['summed_superclass_accuracy']:.4f}  "
        f"on {evaluation['images']} test images"
        + (
            f" (of the known classes; held out: {', '.join(held)})"
            if (held := evaluation.get("held_out_classes", {}).get("classes"))
            else ""
        )
    )
