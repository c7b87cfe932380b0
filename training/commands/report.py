"""python -m training report: reports/<id>/ for exported models, or with --traffic, the
traffic page of each model in the service's payload log, or with --compare, the rollout
page of each model a shadow candidate answered for in it."""

import argparse
from pathlib import Path

from contract.modelcard import FEATURES_NAME
from training.commands.options import DEFAULT_REPORTS_DIR, Options, load_data
from training.errors import ReportError
from training.export import exported_card, exported_outputs
from training.models import MODEL_IDS
from training.report.rollout import write_rollout
from training.report.traffic import Classes, read_log, write_traffic
from training.report.write import COMPARE_DIR, write_reports


def add(commands: argparse._SubParsersAction, options: Options) -> None:
    parser = commands.add_parser(
        "report",
        parents=[options.data, options.models_dir],
        help="write reports/<id>/ for exported models",
    )
    parser.add_argument("--model", choices=MODEL_IDS, help="default: every model in --models-dir")
    parser.add_argument("--reports-dir", type=Path, default=DEFAULT_REPORTS_DIR)
    parser.add_argument(
        "--unfamiliar",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="other images to measure familiarity on: a folder of image files (any size, "
        "made 32x32 as the service does with resize=true) or a cifar-100-python folder or "
        "archive (its test images); may be given more than once",
    )
    parser.add_argument(
        "--traffic",
        type=Path,
        metavar="DIR",
        help="instead: the traffic page of each model in this payload log (the service's "
        "PAYLOAD_LOG), reports/<id>/traffic.html, against the training class counts in the "
        "model file's card (--models-dir); needs no dataset, unless a file exported before "
        "cards carried the counts is to be compared: then give --data-dir",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="instead: a shadow candidate against the serving version, from this payload log "
        "(the rows a candidate also answered), reports/<id>/rollout-<id>.html; class names "
        "from the model files' cards (--models-dir), like --traffic",
    )
    # The dataset is loaded here, only where needed: the log pages read the card.
    parser.set_defaults(command=run, needs_data=False)


def run(args: argparse.Namespace) -> None:
    if args.compare is not None:
        return run_compare(args)
    if args.traffic is not None:
        return run_traffic(args)
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
    data = load_data(args)
    for report in write_reports(found, data, args.reports_dir, args.unfamiliar):
        print(
            f"Wrote {args.reports_dir / report['model_id'] / 'index.html'}: "
            f"top-1 {report['top1_accuracy']:.4f} (original {report['original_accuracy']:.2f})"
        )
    if len(found) > 1:
        print(f"Wrote {args.reports_dir / COMPARE_DIR / 'index.html'}: the models side by side")


def run_traffic(args: argparse.Namespace) -> None:
    """The traffic pages, from the log and the model files' cards; the dataset only when a
    card lacks the training class counts and --data-dir (or $CIFAR100_DIR) names one."""
    logged = read_log(args.traffic)
    if args.model is not None:
        if args.model not in logged:
            raise ReportError(f"the payload log in {args.traffic} has no images of {args.model}")
        logged = {args.model: logged[args.model]}
    cards = cards_of(args.models_dir, logged)
    lacking = [i for i in logged if i not in cards or cards[i].training_class_counts is None]
    data = load_data(args) if lacking and args.data_dir is not None else None
    if lacking and data is None:
        print(f"{', '.join(lacking)}: no training class counts in a model card and no "
              "--data-dir: the class mix is not compared", flush=True)  # fmt: skip
    for report in write_traffic(logged, cards, data, args.reports_dir):
        print(f"Wrote {args.reports_dir / report['model_id'] / 'traffic.html'}: "
              f"{report['images']} images")  # fmt: skip


def run_compare(args: argparse.Namespace) -> None:
    """The rollout pages, from the log; the class names from the model files' cards, else
    the dataset (--data-dir)."""
    logged = read_log(args.compare)
    cards = cards_of(args.models_dir, logged)
    data = load_data(args) if set(logged) - set(cards) and args.data_dir is not None else None

    def classes(model_id: str) -> Classes:  # asked only for the models a candidate shadowed
        return Classes.of(cards.get(model_id), data)

    for report in write_rollout(logged, classes, args.reports_dir, args.compare, args.model):
        name = report["model_id"]
        print(f"Wrote {args.reports_dir / name / f'rollout-{name}.html'}: "
              f"{len(report['comparisons'])} comparison(s)")  # fmt: skip


def cards_of(models_dir: Path, logged: dict) -> dict:
    """The cards of the model files in `models_dir` whose id the log holds."""
    cards = {}
    for path in sorted(Path(models_dir).glob("*.onnx")):
        card = exported_card(path)
        if card is not None and card.model_id in logged:
            cards[card.model_id] = card
    return cards
