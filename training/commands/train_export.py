"""python -m training train-export: both models, each trained, evaluated and exported (what
`make train-export` runs)."""

import argparse

from training import data as cifar
from training.commands import evaluate, export, train
from training.commands.options import Options, recipe_of
from training.export import exported_card
from training.models import MODEL_IDS
from training.sign import key_option
from training.train import run_state


def add(commands: argparse._SubParsersAction, options: Options) -> None:
    parser = commands.add_parser(
        "train-export",
        parents=[
            options.data,
            options.recipe,
            options.models_dir,
            options.familiarity,
            key_option(),
        ],
        help="train, evaluate and export both models (what `make train-export` runs)",
    )
    parser.set_defaults(command=run, weights=None)


def run(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    """Run again after an interruption, it skips what is done with this recipe, resumes
    what was cut short, starts the rest."""
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
            train.run(args, data)
        evaluate.run(args, data)
        export.run(args, data)
