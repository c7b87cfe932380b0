"""python -m training gpu-check: train, export and serve on an NVIDIA GPU, on synthetic
data (training/gpu_check.py, in a process of its own)."""

import argparse
import subprocess
import sys

from training.commands.options import Options


def add(commands: argparse._SubParsersAction, options: Options) -> None:
    parser = commands.add_parser(
        "gpu-check",
        add_help=False,
        help="train, export and serve on an NVIDIA GPU, on synthetic data (make gpu-check; "
        "options: python -m training.gpu_check --help)",
    )
    parser.add_argument("options", nargs=argparse.REMAINDER)
    parser.set_defaults(command=run, needs_data=False)


def run(args: argparse.Namespace) -> int:
    """In a fresh process: this one has imported TensorFlow, and the check must not."""
    return subprocess.run([sys.executable, "-m", "training.gpu_check", *args.options]).returncode
