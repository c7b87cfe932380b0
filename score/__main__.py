"""python -m score: classify a folder, a glob, a list of paths or a CIFAR-100 archive into
Parquet shards, with the service's decode, model file and answers, on Ray Data.

  python -m score --model cifar100-5735844 --input photos/ --output scores/

Local Ray by default; on a cluster when RAY_ADDRESS is set, or under `ray job submit`.
A rerun into the same --output scores only the shards not written yet.
"""

import argparse
import os
import sys
from pathlib import Path

from contract.trust import TrustedKeys, UnusableKeys
from score.inputs import InputError, list_inputs
from score.job import JobError, Resources, find_model, run
from service.config import Settings
from service.schemas import DEFAULT_TOP_K


def default(name: str):
    """The service's default for a setting: one source for the limits both apply."""
    return Settings.model_fields[name].default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--model", required=True, help="model id (newest version), or a .onnx")
    parser.add_argument(
        "--input",
        required=True,
        help="folder, quoted glob, .parquet/.csv list of paths, or "
        "cifar-100-python folder or archive",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder of Parquet shards")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ.get("MODELS_DIR") or default("models_dir")),
        help="where --model's id is looked up (default: MODELS_DIR, else models/)",
    )
    parser.add_argument(
        "--trusted-keys",
        type=Path,
        default=os.environ.get("TRUSTED_KEYS") or None,
        help="a public key file or a folder of them: only a model file signed by one is "
        "scored, verified where each actor loads it, as the service does (default: "
        "TRUSTED_KEYS; unset: not verified)",
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="fine classes per image")
    parser.add_argument(
        "--resize",
        action="store_true",
        help="centre-crop and resize images that are not 32x32, as /predict's "
        "resize=true; without it they are error rows",
    )
    parser.add_argument("--features", action="store_true", help="add the features column")
    parser.add_argument("--column", default="path", help="the list's column of paths")
    parser.add_argument("--split", default="test", help="CIFAR-100 split to score")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per Parquet file")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=default("batch_max_size"),
        help="images per onnxruntime call (what each actor warms up)",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=default("max_upload_bytes"),
        help="larger files are error rows (the service's MAX_UPLOAD_BYTES)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=default("max_image_pixels"),
        help="larger images are error rows (MAX_IMAGE_PIXELS)",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "onnxruntime", "openvino"),
        default=os.environ.get("ENGINE") or default("engine"),
        help="what computes the file on each actor (default: ENGINE, else auto; as the "
        "service's ENGINE)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default=os.environ.get("PRECISION") or default("precision"),
        help="what a float32 file is computed in (default: PRECISION, else auto: bfloat16 on "
        "CPUs that have it and files that promise it; float32 for the same numbers on every "
        "node)",
    )
    parser.add_argument("--actors", type=int, help="default: as many as the cluster holds")
    parser.add_argument(
        "--cpus-per-actor",
        type=int,
        default=1,
        help="CPUs each actor holds, and its onnxruntime threads",
    )
    parser.add_argument(
        "--gpus-per-actor",
        type=int,
        default=0,
        choices=(0, 1),
        help="1: one actor per GPU, onnxruntime's CUDA provider",
    )
    parser.add_argument(
        "--progress-seconds",
        type=float,
        default=5.0,
        help="how often progress is printed when stderr is not a terminal",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("top_k", "shard_size", "batch_size", "max_bytes", "max_pixels", "cpus_per_actor"):
        if getattr(args, name) < 1:
            raise SystemExit(f"score: --{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.top_k <= 100:
        raise SystemExit("score: --top-k must be from 1 to 100")
    try:
        inputs = list_inputs(args.input, args.column, args.split)
        if not inputs.paths:
            raise InputError(f"{args.input}: no files to score")
        trusted = TrustedKeys(args.trusted_keys) if args.trusted_keys else None
        model = find_model(args.models_dir, args.model, trusted)
        options = {
            "top_k": args.top_k,
            "resize": args.resize,
            "features": args.features,
            "max_bytes": args.max_bytes,
            "max_pixels": args.max_pixels,
            "batch_size": args.batch_size,
            "engine": args.engine,
            "precision": args.precision,
        }
        resources = Resources(args.actors, args.cpus_per_actor, args.gpus_per_actor)
        summary = run(
            inputs, args.output, model, options, resources, args.shard_size,
            args.progress_seconds, args.trusted_keys,
        )  # fmt: skip
    except (InputError, JobError) as err:
        print(f"score: {err}", file=sys.stderr)
        return 2
    except UnusableKeys as err:
        print(f"score: {err.message}", file=sys.stderr)
        return 2
    except OSError as err:  # the output folder, a shard that cannot be written
        print(f"score: {err.filename or args.output}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(
        f"score: done: {summary['images']:,} images in {summary['shards']} shard(s) in "
        f"{args.output} ({summary['already_written']} were already written; "
        f"{summary['errors']:,} error rows among the ones written now)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
