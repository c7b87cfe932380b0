"""python -m training ablate: variants of the recipe, several seeds each, into
runs/ablation-ID/ (training/ablation.py)."""

import argparse

from training import ablation
from training import data as cifar
from training.commands.options import Options, recipe_of
from training.errors import RecipeError
from training.models import MODEL_IDS


def add(commands: argparse._SubParsersAction, options: Options) -> None:
    parser = commands.add_parser(
        "ablate",
        parents=[options.data, options.recipe],
        help="train variants of the recipe, several seeds each, into runs/ablation-ID/",
    )
    parser.add_argument("--model", required=True, choices=MODEL_IDS)
    parser.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=list(ablation.VARIANTS),
        help=f"comma-separated, from: {', '.join(ablation.VARIANTS)} (default: all)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds --seed, --seed+1, ...")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace, data: cifar.Cifar100) -> None:
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
