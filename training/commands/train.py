"""python -m training train: train one model (resuming an interrupted run on --resume)."""

import argparse

from training import data as cifar
from training.commands.options import Options, recipe_of
from training.models import MODEL_IDS
from training.train import train


def add(commands: argparse._SubParsersAction, options: Options) -> None:
    parser = commands.add_parser("train", parents=[options.data, options.recipe],
                                 help="train one model")  # fmt: skip
    parser.add_argument("--model", required=True, choices=MODEL_IDS)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.set_defaults(command=run)


def run(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    run_dir = args.runs_dir / args.model
    best = train(args.model, data, run_dir, recipe_of(args), args.resume, devices=args.gpus)
    print(f"Best checkpoint: {best}")
