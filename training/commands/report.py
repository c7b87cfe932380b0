"""python -m training report: reports/<id>/ for exported models, or with --traffic, the
traffic page of each model in the service's payload log, or with --compare, the rollout
page of each model a shadow candidate answered for in it."""

import argparse
from pathlib import Path

from contract.modelcard import FEATURES_NAME
from training import data as cifar
from training.commands.options import DEFAULT_REPORTS_DIR, Options
from training.errors import ReportError
from training.export import exported_outputs
from training.models import MODEL_IDS
from training.report.rollout import write_rollout
from training.report.traffic import write_traffic
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
        "PAYLOAD_LOG), reports/<id>/traffic.html, against the training set",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="instead: a shadow candidate against the serving version, from this payload log "
        "(the rows a candidate also answered), reports/<id>/rollout-<id>.html",
    )
    parser.set_defaults(command=run)


def run(args: argparse.Namespace, data: cifar.Cifar100) -> None:
    if args.compare is not None:
        for report in write_rollout(args.compare, data, args.reports_dir, args.model):
            name = report["model_id"]
            print(f"Wrote {args.reports_dir / name / f'rollout-{name}.html'}: "
                  f"{len(report['comparisons'])} comparison(s)")  # fmt: skip
        return
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
