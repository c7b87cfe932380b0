"""python -m training COMMAND: train, score, export, sign and study the models, and check
the whole pipeline on a GPU (train, evaluate, export, report, train-export, ablate, ood,
export-triton, sign, gpu-check). One module per command in training/commands/."""

import argparse
import sys

if __name__ == "__main__" and sys.argv[1:2] == ["export-triton"]:
    # Written from the ONNX files alone: skip the seconds importing TensorFlow takes, and
    # run where only the service's dependencies are installed.
    from training.triton import main as export_triton

    sys.exit(export_triton(sys.argv[1:]))
if __name__ == "__main__" and sys.argv[1:2] == ["sign"]:
    # Signing reads the files alone: no TensorFlow, as for export-triton.
    from training.commands.sign import main as sign_files

    sys.exit(sign_files(sys.argv[1:]))
if __name__ == "__main__" and sys.argv[1:2] == ["gpu-check"]:
    # The training image's entry for `make gpu-check`: it runs training and serving in
    # processes of their own and must not load TensorFlow itself.
    from training.gpu_check import main as gpu_check

    sys.exit(gpu_check(sys.argv[2:]))

from training import triton
from training.commands import (
    ablate,
    evaluate,
    export,
    gpu_check,
    ood,
    report,
    sign,
    train,
    train_export,
)
from training.commands.options import load_data, options
from training.errors import TrainingError

# In the order `--help` lists them.
COMMANDS = (train, evaluate, export, report, train_export, ablate, ood, triton, sign, gpu_check)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what ran, for the records
    try:
        if not getattr(args, "needs_data", True):  # export-triton, gpu-check
            return args.command(args) or 0
        args.command(args, load_data(args))
    except TrainingError as err:  # ours, with a message that says it all; bugs keep tracebacks
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = root.add_subparsers(required=True, metavar="COMMAND")
    shared = options()
    for command in COMMANDS:
        command.add(commands, shared)
    return root


if __name__ == "__main__":
    sys.exit(main())
