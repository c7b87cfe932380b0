"""python -m training export: a run's best checkpoint (or a Keras 2 weights file) to
models/<id>.onnx, or, with --precision, an int8 or float16 twin of that file."""

import argparse
import json
import time
from pathlib import Path

import keras

from contract.modelcard import ModelCard
from training import data as cifar
from training import float16, quantize, twins
from training.commands.evaluate import evaluate_model, evaluation_of
from training.commands.options import Options
from training.errors import ExportError
from training.export import export
from training.models import MODEL_IDS, load_original_weights
from training.sign import key_option, report_written
from training.train import best_checkpoint, saved_recipe


def add(commands: argparse._SubParsersAction, options: Options) -> None:
    parser = commands.add_parser(
        "export",
        parents=[options.data, options.models_dir, options.familiarity, key_option()],
        help="write models/<id>.onnx (and its signature bundle, with --signing-key)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=MODEL_IDS, help="export the run's best checkpoint")
    source.add_argument("--weights", type=Path, help="export a Keras 2 .hdf5 weights file")
    parser.add_argument(
        "--precision",
        choices=twins.PRECISIONS,
        default="float32",
        help="float32 (default): export the checkpoint; int8 (CPUs) or float16 (GPUs): convert "
        "the float32 export models/<id>.onnx into models/<id>-<precision>.onnx, written only "
        "if it keeps to the float model on the test split",
    )
    parser.set_defaults(command=run)


def run(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    if getattr(args, "precision", "float32") != "float32":  # train-export has no --precision
        return run_twin(args, data)
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
        reference_labels=data.test.fine,
        train_images=data.train.images,
        train_labels=data.train.fine,
        val_images=data.val.images,
        familiarity_score=args.familiarity_score,
    )
    report_written(path, args.signing_key)


def run_twin(args: argparse.Namespace, data: cifar.Cifar100) -> None:
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
    report_written(target, args.signing_key)
