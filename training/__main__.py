"""python -m training {train,evaluate,export,train-export}: train, score and export the models."""

import argparse
import json
import os
import sys
from pathlib import Path

import keras

from service.modelcard import ModelCard
from training import data as cifar
from training.atomic import write_text
from training.evaluate import evaluate_test_set
from training.export import ExportError, export
from training.models import MODEL_IDS, load_original_weights
from training.report import write_report
from training.train import Recipe, best_checkpoint, train

DEFAULT_RUNS_DIR = Path("runs")
DEFAULT_MODELS_DIR = Path("models")
DEFAULT_REPORTS_DIR = Path("reports")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.command(args, load_data(args))
    except (cifar.DataError, ExportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = root.add_subparsers(required=True, metavar="COMMAND")

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
    recipe.add_argument("--epochs", type=int, default=48)
    recipe.add_argument("--batch-size", type=int, default=128)
    recipe.add_argument("--learning-rate", type=float, default=1e-3)
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument("--no-augment", dest="augment", action="store_false")
    recipe.add_argument("--resume", action="store_true", help="continue an interrupted run")

    models_dir = argparse.ArgumentParser(add_help=False)
    models_dir.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)

    train = commands.add_parser("train", parents=[data, recipe], help="train one model")
    train.add_argument("--model", required=True, choices=MODEL_IDS)
    train.set_defaults(command=run_train)

    evaluate = commands.add_parser("evaluate", parents=[data], help="score the best checkpoint")
    evaluate.add_argument("--model", required=True, choices=MODEL_IDS)
    evaluate.set_defaults(command=run_evaluate)

    export = commands.add_parser(
        "export", parents=[data, models_dir], help="write models/<id>.onnx"
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=MODEL_IDS, help="export the run's best checkpoint")
    source.add_argument("--weights", type=Path, help="export a Keras 2 .hdf5 weights file")
    export.set_defaults(command=run_export)

    report = commands.add_parser(
        "report", parents=[data, models_dir], help="write reports/<id>/ for exported models"
    )
    report.add_argument("--model", choices=MODEL_IDS, help="default: every model in --models-dir")
    report.add_argument("--reports-dir", type=Path, default=DEFAULT_REPORTS_DIR)
    report.set_defaults(command=run_report)

    everything = commands.add_parser(
        "train-export",
        parents=[data, recipe, models_dir],
        help="train, evaluate and export both models (what `make train-export` runs)",
    )
    everything.set_defaults(command=run_train_export, weights=None)
    return root


def run_train_export(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    for model_id in MODEL_IDS:
        args.model = model_id
        run_train(args, data)
        run_evaluate(args, data)
        run_export(args, data)


def run_train(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    recipe = Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        augment=args.augment,
        seed=args.seed,
    )
    best = train(args.model, data, args.runs_dir / args.model, recipe, resume=args.resume)
    print(f"Best checkpoint: {best}")


def run_evaluate(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    checkpoint = best_checkpoint(args.runs_dir / args.model)
    print_metrics(evaluation_of(checkpoint, data))


def run_export(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    if args.weights:
        model = load_original_weights(args.weights)
        model_id = model.name
        training = {"source": args.weights.name, "recipe": "original Keras 2 experiment"}
        evaluation = evaluate_model(model, data)
    else:
        model_id = args.model
        checkpoint = best_checkpoint(args.runs_dir / model_id)
        model = keras.models.load_model(checkpoint)
        saved = json.loads((checkpoint.parent / "recipe.json").read_text())
        training = {"source": checkpoint.name, "recipe": saved["recipe"], "method": saved["method"]}
        evaluation = evaluation_of(checkpoint, data)
    card = ModelCard(
        model_id=model_id,
        class_names=data.class_names,
        superclass_names=data.superclass_names,
        fine_to_coarse=data.fine_to_coarse,
        parameter_count=model.count_params(),
        training=training,
        evaluation=evaluation,
    )
    path = args.models_dir / f"{model_id}.onnx"
    export(model, card, path, parity_images=data.test.images[:256])
    print(f"Wrote {path}")


def run_report(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    ids = [args.model] if args.model else MODEL_IDS
    paths = [args.models_dir / f"{model_id}.onnx" for model_id in ids]
    found = [path for path in paths if path.exists()]
    if not found:
        raise cifar.DataError(f"no exported model in {args.models_dir}; run train-export first")
    for path in found:
        out = args.reports_dir / path.stem
        report = write_report(path, data, out)
        print(
            f"Wrote {out / 'index.html'}: top-1 {report['top1_accuracy']:.4f} "
            f"(original {report['original_accuracy']:.2f})"
        )


def load_data(args: argparse.Namespace) -> cifar.Cifar100:
    data = cifar.load(args.data_dir, args.cache_dir, args.val_size)
    print(
        f"CIFAR-100 from {data.source}: {len(data.train)} train, {len(data.val)} validation, "
        f"{len(data.test)} test images",
        flush=True,
    )
    return data


def evaluation_of(checkpoint: Path, data: cifar.Cifar100) -> dict:
    """The checkpoint's test-set metrics, from evaluation.json when it is for this checkpoint."""
    saved = checkpoint.parent / "evaluation.json"
    if (
        saved.exists()
        and (result := json.loads(saved.read_text())).get("checkpoint") == checkpoint.name
    ):
        return result
    result = {
        "checkpoint": checkpoint.name,
        **evaluate_model(keras.models.load_model(checkpoint), data),
    }
    write_text(saved, json.dumps(result, indent=2))
    print(f"Wrote {saved}")
    return result


def evaluate_model(model: keras.Model, data: cifar.Cifar100) -> dict:
    return evaluate_test_set(lambda images: model.predict(images, batch_size=512, verbose=0), data)


def print_metrics(evaluation: dict) -> None:
    print(
        f"top-1 {evaluation['top1_accuracy']:.4f}  top-5 {evaluation['top5_accuracy']:.4f}  "
        f"superclass {evaluation['superclass_accuracy']:.4f}  on {evaluation['images']} test images"
    )


if __name__ == "__main__":
    sys.exit(main())
