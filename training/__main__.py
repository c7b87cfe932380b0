"""python -m training {train,evaluate,export,train-export,report,ablate,export-triton,gpu-check}:
train, score, export and study the models, and check the whole pipeline on a GPU."""

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

if __name__ == "__main__" and sys.argv[1:2] == ["export-triton"]:
    # Written from the ONNX files alone: skip the seconds importing TensorFlow takes, and
    # run where only the service's dependencies are installed.
    from training.triton import main as export_triton

    sys.exit(export_triton(sys.argv[1:]))
if __name__ == "__main__" and sys.argv[1:2] == ["gpu-check"]:
    # The training image's entry for `make gpu-check`: it runs training and serving in
    # processes of their own and must not load TensorFlow itself.
    from training.gpu_check import main as gpu_check

    sys.exit(gpu_check(sys.argv[2:]))

import keras

from contract.modelcard import FEATURES_NAME, ModelCard
from training import ablation, float16, ood, quantize, scores, triton, twins
from training import data as cifar
from training.atomic import write_text
from training.errors import ExportError, RecipeError, ReportError, TrainingError
from training.evaluate import evaluate_test_set
from training.export import export, exported_card, exported_outputs
from training.models import MODEL_IDS, load_original_weights
from training.recipe import AUGMENTATIONS, OPTIMIZERS, SCHEDULES, Recipe
from training.report.traffic import write_traffic
from training.report.write import COMPARE_DIR, write_reports
from training.scores import evidence
from training.train import best_checkpoint, run_state, saved_recipe, train

DEFAULT_RUNS_DIR = Path("runs")
DEFAULT_MODELS_DIR = Path("models")
DEFAULT_REPORTS_DIR = Path("reports")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what ran, for the records
    try:
        if args.command is triton.run:  # reads the exports only, never the dataset
            triton.run(args)
        elif args.command is run_gpu_check:  # makes its own dataset
            return run_gpu_check(args)
        else:
            args.command(args, load_data(args))
    except TrainingError as err:  # ours, with a message that says it all; bugs keep tracebacks
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

    strangeness = argparse.ArgumentParser(add_help=False)
    strangeness.add_argument(
        "--familiarity-score",
        choices=scores.SCORES,
        default=scores.DEFAULT,
        help="the strangeness score the file's familiarity output calibrates (default "
        "%(default)s, chosen by `python -m training ood`)",
    )

    train = commands.add_parser("train", parents=[data, recipe], help="train one model")
    train.add_argument("--model", required=True, choices=MODEL_IDS)
    train.add_argument("--resume", action="store_true", help="continue an interrupted run")
    train.set_defaults(command=run_train)

    evaluate = commands.add_parser("evaluate", parents=[data], help="score the best checkpoint")
    evaluate.add_argument("--model", required=True, choices=MODEL_IDS)
    evaluate.set_defaults(command=run_evaluate)

    export = commands.add_parser(
        "export", parents=[data, models_dir, strangeness], help="write models/<id>.onnx"
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=MODEL_IDS, help="export the run's best checkpoint")
    source.add_argument("--weights", type=Path, help="export a Keras 2 .hdf5 weights file")
    export.add_argument(
        "--precision",
        choices=twins.PRECISIONS,
        default="float32",
        help="float32 (default): export the checkpoint; int8 (CPUs) or float16 (GPUs): convert "
        "the float32 export models/<id>.onnx into models/<id>-<precision>.onnx, written only "
        "if it keeps to the float model on the test split",
    )
    export.set_defaults(command=run_export)

    report = commands.add_parser(
        "report", parents=[data, models_dir], help="write reports/<id>/ for exported models"
    )
    report.add_argument("--model", choices=MODEL_IDS, help="default: every model in --models-dir")
    report.add_argument("--reports-dir", type=Path, default=DEFAULT_REPORTS_DIR)
    report.add_argument(
        "--unfamiliar",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="other images to measure familiarity on: a folder of image files (any size, "
        "made 32x32 as the service does with resize=true) or a cifar-100-python folder or "
        "archive (its test images); may be given more than once",
    )
    report.add_argument(
        "--traffic",
        type=Path,
        metavar="DIR",
        help="instead: the traffic page of each model in this payload log (the service's "
        "PAYLOAD_LOG), reports/<id>/traffic.html, against the training set",
    )
    report.set_defaults(command=run_report)

    everything = commands.add_parser(
        "train-export",
        parents=[data, recipe, models_dir, strangeness],
        help="train, evaluate and export both models (what `make train-export` runs)",
    )
    everything.set_defaults(command=run_train_export, weights=None)

    ablate = commands.add_parser(
        "ablate",
        parents=[data, recipe],
        help="train variants of the recipe, several seeds each, into runs/ablation-ID/",
    )
    ablate.add_argument("--model", required=True, choices=MODEL_IDS)
    ablate.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=list(ablation.VARIANTS),
        help=f"comma-separated, from: {', '.join(ablation.VARIANTS)} (default: all)",
    )
    ablate.add_argument("--seeds", type=int, default=3, help="seeds --seed, --seed+1, ...")
    ablate.set_defaults(command=run_ablate)

    ood_command = commands.add_parser(
        "ood",
        parents=[data, recipe],
        help="measure every familiarity score on held-out classes and generated image "
        "families (trains one model per pair and seed, into runs/ood/)",
    )
    ood_command.add_argument("--model", choices=MODEL_IDS, default=MODEL_IDS[0])
    ood_command.add_argument(
        "--pairs",
        nargs="+",
        type=class_list,
        required=True,
        metavar="CLASS,CLASS",
        help="the classes each run holds out of training, one group per run",
    )
    ood_command.add_argument("--seeds", type=int, default=2, help="seeds --seed, --seed+1, ...")
    ood_command.add_argument("--images", type=int, default=500, help="images per family")
    ood_command.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results/published/familiarity.json"),
        help="where the results go, as JSON (default %(default)s); the table is printed",
    )
    ood_command.set_defaults(command=run_ood)

    triton.add_command(commands)  # export-triton: a Triton model repository, no TensorFlow
    gpu_check = commands.add_parser(
        "gpu-check",
        add_help=False,
        help="train, export and serve on an NVIDIA GPU, on synthetic data (make gpu-check; "
        "options: python -m training.gpu_check --help)",
    )
    gpu_check.add_argument("options", nargs=argparse.REMAINDER)
    gpu_check.set_defaults(command=run_gpu_check)
    return root


def run_train_export(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    """Both models, each trained, evaluated and exported. Run again after an interruption,
    it skips what is done with this recipe, resumes what was cut short, starts the rest."""
    recipe = recipe_of(args)
    for model_id in MODEL_IDS:
        args.model = model_id
        card = exported_card(args.models_dir / f"{model_id}.onnx")
        if card is not None and card.training.get("recipe") == recipe.record():
            print(f"{model_id}: already exported with this recipe, skipping it", flush=True)
            continue
        state = run_state(args.runs_dir / model_id, recipe)
        if state == "finished":
            print(f"{model_id}: already trained with this recipe", flush=True)
        else:
            args.resume = state == "interrupted"
            run_train(args, data)
        run_evaluate(args, data)
        run_export(args, data)


def run_gpu_check(args: argparse.Namespace) -> int:
    """In a fresh process: this one has imported TensorFlow, and the check must not."""
    return subprocess.run([sys.executable, "-m", "training.gpu_check", *args.options]).returncode


def run_train(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    run_dir = args.runs_dir / args.model
    best = train(args.model, data, run_dir, recipe_of(args), args.resume, devices=args.gpus)
    print(f"Best checkpoint: {best}")


def class_list(text: str) -> tuple[str, ...]:
    """--hold-out bed,bottle -> ("bed", "bottle"); the names are checked against the
    dataset's when training starts."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def recipe_of(args: argparse.Namespace) -> Recipe:
    try:
        return Recipe(**{field.name: getattr(args, field.name) for field in fields(Recipe)})
    except ValueError as err:
        raise RecipeError(str(err)) from None


def run_ablate(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    unknown = sorted(set(args.variants) - set(ablation.VARIANTS))
    if unknown:
        raise RecipeError(f"unknown variant(s) {', '.join(unknown)}; choose from "
                          f"{', '.join(ablation.VARIANTS)}")  # fmt: skip
    if args.seeds < 1:
        raise RecipeError("--seeds must be at least 1")
    table = ablation.run(
        args.model,
        data,
        args.runs_dir / f"ablation-{args.model}",
        recipe_of(args),
        args.variants,
        range(args.seed, args.seed + args.seeds),
        devices=args.gpus,
    )
    print(table)


def run_ood(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    if args.seeds < 1 or args.images < 10:
        raise RecipeError("--seeds must be at least 1 and --images at least 10")
    result = ood.measure(
        args.model,
        data,
        args.runs_dir / "ood",
        recipe_of(args),
        args.pairs,
        list(range(args.seed, args.seed + args.seeds)),
        args.images,
    )
    result["command"] = "python -m training " + shlex.join(args.argv)
    write_text(args.output, json.dumps(result, indent=2))
    print(evidence.table(result))
    print(f"Wrote {args.output}")


def run_evaluate(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    checkpoint = best_checkpoint(args.runs_dir / args.model)
    print_metrics(evaluation_of(checkpoint, data))


def run_export(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    if getattr(args, "precision", "float32") != "float32":  # train-export has no --precision
        return run_export_precision(args, data)
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
        # Held-out classes leave the training and validation images (familiarity is fitted
        # and calibrated on those); the test split keeps them, scored apart.
        data = cifar.without_classes(data, saved_recipe(checkpoint.parent).held_out_classes)
        training = {"source": checkpoint.name, "recipe": saved["recipe"], "method": saved["method"]}
        training["choice"] = saved["choice"]
        # The service serves the newest version of a model by this date.
        training["trained_at"] = time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(checkpoint.stat().st_mtime)
        )
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
    export(
        model,
        card,
        path,
        parity_images=data.test.images[:256],
        reference_images=data.test.images,
        train_images=data.train.images,
        train_labels=data.train.fine,
        val_images=data.val.images,
        familiarity_score=args.familiarity_score,
    )
    print(f"Wrote {path}")


def run_export_precision(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    """int8 or float16: a twin of the float32 export, from that file (training/quantize.py,
    training/float16.py)."""
    if args.weights:
        raise ExportError(
            f"--precision {args.precision} converts an exported file, models/<id>.onnx: name "
            "it with --model (export the weights first, without --precision)"
        )
    source = args.models_dir / f"{args.model}.onnx"
    if not source.exists():
        raise ExportError(
            f"{source} does not exist: --precision {args.precision} converts the float32 "
            f"export; run `python -m training export --model {args.model}` first"
        )
    if args.precision == "int8":
        target = args.models_dir / f"{quantize.int8_model_id(args.model)}.onnx"
        quantize.export_int8(source, target, data)
    else:
        target = args.models_dir / f"{float16.float16_model_id(args.model)}.onnx"
        float16.export_float16(source, target, data)
    print(f"Wrote {target}")


def run_report(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    if args.traffic is not None:
        for report in write_traffic(args.traffic, data, args.reports_dir, args.model):
            print(f"Wrote {args.reports_dir / report['model_id'] / 'traffic.html'}: "
                  f"{report['images']} images")  # fmt: skip
        return
    ids = [args.model] if args.model else MODEL_IDS
    paths = [args.models_dir / f"{model_id}.onnx" for model_id in ids]
    found = [path for path in paths if path.exists()]
    if not found:
        raise ReportError(f"no exported model in {args.models_dir}; run train-export first")
    for path in found:
        if FEATURES_NAME not in (outputs := exported_outputs(path)):
            raise ReportError(
                f"{path} has no {FEATURES_NAME!r} output (it has: {', '.join(outputs)}), which "
                "the report's feature map needs; export the model with `python -m training export`"
            )
    for report in write_reports(found, data, args.reports_dir, args.unfamiliar):
        print(
            f"Wrote {args.reports_dir / report['model_id'] / 'index.html'}: "
            f"top-1 {report['top1_accuracy']:.4f} (original {report['original_accuracy']:.2f})"
        )
    if len(found) > 1:
        print(f"Wrote {args.reports_dir / COMPARE_DIR / 'index.html'}: the models side by side")


def load_data(args: argparse.Namespace) -> cifar.Cifar100:
    data = cifar.load(args.data_dir, args.cache_dir, args.val_size)
    print(
        f"CIFAR-100 from {data.source}: {len(data.train)} train, {len(data.val)} validation, "
        f"{len(data.test)} test images",
        flush=True,
    )
    return data


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


if __name__ == "__main__":
    sys.exit(main())
