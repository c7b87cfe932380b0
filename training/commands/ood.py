"""python -m training ood: every familiarity score measured on held-out classes and
generated image families (training/ood.py), the results written as JSON."""

import argparse
import json
import shlex
from pathlib import Path

from training import data as cifar
from training import ood
from training.atomic import write_text
from training.commands.options import Options, class_list, recipe_of
from training.errors import RecipeError
from training.models import MODEL_IDS
from training.scores import evidence


def add(commands: argparse._SubParsersAction, options: Options) -> None:
    parser = commands.add_parser(
        "ood",
        parents=[options.data, options.recipe],
        help="measure every familiarity score on held-out classes and generated image "
        "families (trains one model per pair and seed, into runs/ood/)",
    )
    parser.add_argument("--model", choices=MODEL_IDS, default=MODEL_IDS[0])
    parser.add_argument(
        "--pairs",
        nargs="+",
        type=class_list,
        required=True,
        metavar="CLASS,CLASS",
        help="the classes each run holds out of training, one group per run",
    )
    parser.add_argument("--seeds", type=int, default=2, help="seeds --seed, --seed+1, ...")
    parser.add_argument("--images", type=int, default=500, help="images per family")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("bench-results/published/familiarity.json"),
        help="where the results go, as JSON (default %(default)s), under the model's id "
        "beside any other model's results already there; the table is printed",
    )
    parser.set_defaults(command=run)


def run(args: argparse.Namespace, data: cifar.Cifar100) -> None:
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
    published = json.loads(args.output.read_text()) if args.output.exists() else {}
    models = published.get("models", {})  # a file of one model only, as once written: replaced
    models[args.model] = result
    write_text(args.output, json.dumps({"models": models}, indent=2))
    print(evidence.table(result))
    print(evidence.judged_table(result))
    print(f"Wrote {args.output}")
