"""python -m training sign: a signature bundle beside each exported file (training/sign.py).

    python -m training sign --key signing.pem                 # models/ and model_repository/
    python -m training sign --key signing.pem models/x.onnx   # these files (folders: their .onnx)

Needs neither TensorFlow nor the dataset: training/__main__.py runs it before importing
either, so it runs where only the service's dependencies are installed.
"""

import argparse
import sys
from pathlib import Path

from training import sign
from training.triton import DEFAULT_MODELS_DIR, DEFAULT_OUT


def add(commands: argparse._SubParsersAction, options: object = None) -> None:
    parser = commands.add_parser(
        "sign",
        help="sign exported files (models/, the Triton repository): <file>.sig beside each",
    )
    parser.add_argument(
        "--key",
        type=Path,
        default=sign.default_key(),
        help=f"EC private key (PEM) (default: ${sign.SIGNING_KEY_ENV})",
    )
    parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        metavar="FILE",
        help=f"files or folders of .onnx files (default: {DEFAULT_MODELS_DIR}/ and "
        f"{DEFAULT_OUT}/ where it exists)",
    )
    parser.set_defaults(command=run, needs_data=False)


def run(args: argparse.Namespace) -> None:
    if args.key is None:
        raise sign.SigningError(f"no key: pass --key or set ${sign.SIGNING_KEY_ENV}")
    defaults = [DEFAULT_MODELS_DIR, *[p for p in [DEFAULT_OUT] if p.is_dir()]]
    files = sign.files_to_sign(args.files or defaults)
    if not files:
        raise sign.SigningError(f"no .onnx file in {', '.join(map(str, args.files or defaults))}")
    key = sign.key_fingerprint(args.key)
    for path in files:
        print(f"Signed {path} -> {sign.sign_file(path, args.key).name} (key {key})", flush=True)


def main(argv: list[str]) -> int:
    """`python -m training sign ...`, dispatched before training/__main__.py imports
    TensorFlow."""
    root = argparse.ArgumentParser(prog="python -m training")
    add(root.add_subparsers(required=True, metavar="COMMAND"))
    args = root.parse_args(argv)
    try:
        args.command(args)
    except sign.SigningError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
