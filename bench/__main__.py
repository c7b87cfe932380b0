"""python -m bench: the command line. Parses the arguments and hands them to a mode.

  python -m bench [run] [--peers] ...   the service against the hardware's ceiling, a
                                        naive server and (opt-in) peers (bench/run.py)
  python -m bench faults ...            faults, overload and amplification (bench/faults.py)
  python -m bench profile ...           where each request's CPU goes (bench/profile.py)
  python -m bench floor ...             server CPU per request against bare ASGI,
                                        Starlette and FastAPI apps (bench/floor.py)
  python -m bench score ...             the score job against the ceiling (bench/scorejob.py)
  python -m bench payloads ...          the payload log's cost, on against off (bench/payloads.py)
  python -m bench shadow ...            shadowing's cost to live latency, on against off
                                        (bench/shadow.py)
Without a mode name, the options are run's: `python -m bench --peers` is `run --peers`.
"""

import argparse
import sys
from pathlib import Path

from bench import faults, floor, payloads, profile, run, scorejob, shadow

MODES = {"run": run, "faults": faults, "profile": profile, "floor": floor, "score": scorejob,
         "payloads": payloads, "shadow": shadow}  # fmt: skip


def one_model_options() -> argparse.ArgumentParser:
    """The options of the modes that measure one model (faults, profile); a fresh parser
    for each, as a mode's `set_defaults` changes the defaults of its parents' options."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--models-dir", type=Path, default=Path("models"))
    parent.add_argument("--model", default="cifar100-5735844")
    parent.add_argument("--out", type=Path, default=Path("bench-results"))
    parent.add_argument("--seconds", type=float, help="per load (default: the mode's)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    text = argparse.RawDescriptionHelpFormatter
    # No abbreviations: argparse reads every option against the top level's (run's)
    # first, so a mode's `--model` was taken for an ambiguous `--models`/`--models-dir`.
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=text, allow_abbrev=False
    )
    run.add_arguments(parser)  # `python -m bench --peers`: run's options without its name
    modes = parser.add_subparsers(dest="mode", title="modes")
    for name, module in MODES.items():
        summary = module.__doc__.split("\n", 1)[0]
        sub = modes.add_parser(
            name,
            help=summary.split(": ", 1)[-1],
            description=module.__doc__,
            formatter_class=text,
            parents=[] if module is run else [one_model_options()],
        )
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return MODES[args.mode or "run"].main(args)


if __name__ == "__main__":
    sys.exit(main())
