"""python -m bench.schemes: int8 quantization schemes measured on the machine at hand.

For each exported float file in --models-dir and each scheme: the int8 file made from it
(calibrated as `export --precision int8` calibrates: 1,000 training images), its top-1
accuracy on the test split beside the float model's, their agreement, how far familiarity
moved, whether its self-check holds here, and its speed against the float file's
(alternating ceiling windows of all CPUs at batch 128, as the benchmark's int8 rows).

Which scheme holds depends on the CPU's int8 instructions (AVX2, AVX-512, VNNI, AMX), so
the result names the CPU. Run it under `qemu-x86_64 -cpu Haswell` for an AVX2-only CPU's
numbers (speeds under emulation mean nothing; the script says so).

    python -m bench.schemes --models-dir models --data-dir PATH [--val-size 5000]
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bench.ceiling import Windows
from bench.steady import ratio_windows
from contract import hardware
from contract.classifier import Classifier
from contract.modelcard import FAMILIARITY_NAME
from service.config import available_cpus
from training import proof
from training.data import load
from training.quantize import INT8, calibration_sample, int8_self_check, quantized_int8
from training.twins import as_trained, card_of, compare_with_float, float_self_check

SCHEMES = {
    "7-bit weights (the default)": INT8,
    "8-bit weights": dataclasses.replace(INT8, reduce_range=False),
    "8-bit weights, per tensor": dataclasses.replace(INT8, reduce_range=False, per_channel=False),
}
BATCH = 128


def measure(source: Path, data, scheme, window_seconds: float, pairs: int) -> dict:
    content = source.read_bytes()
    float_check = float_self_check(content)
    trained = as_trained(data, card_of(onnx.load_from_string(content)))
    calibration = calibration_sample(trained.train.images)
    proto = quantized_int8(content, calibration, scheme, calibration_note="bench.schemes")
    comparison = compare_with_float(content, proto, trained)
    agreed = round(comparison["top1_agreement"] * comparison["images"])
    check = int8_self_check(content, float_check, comparison["images"] - agreed,
                            comparison["images"])  # fmt: skip
    row = {
        "images": comparison["images"],
        "top1": comparison["top1_accuracy"],
        "float32_top1": comparison["float32_top1_accuracy"],
        "agreement": comparison["top1_agreement"],
        "familiarity_moved": comparison.get(f"{FAMILIARITY_NAME}_mean_abs_difference"),
        "self_check": proof.problems(proto, check) or "holds",
    }
    if pairs:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "int8.onnx"
            path.write_bytes(proto.SerializeToString())
            int8 = Windows(Classifier(path, "cpu", available_cpus(), 1), BATCH, window_seconds)
            ref = Windows(Classifier(source, "cpu", available_cpus(), 1), BATCH, window_seconds)
            row["speed_vs_float"] = ratio_windows(int8, ref, pairs)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.schemes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--window-seconds", type=float, default=3.0)
    parser.add_argument("--pairs", type=int, default=5, help="speed windows; 0: no speed")
    parser.add_argument("--out", type=Path, default=Path("bench-results/schemes.json"))
    parser.add_argument("--scheme", choices=list(SCHEMES), action="append",
                        help="only these (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    schemes = {name: SCHEMES[name] for name in args.scheme or SCHEMES}
    data = load(args.data_dir, val_size=args.val_size)
    machine = hardware.cpu()
    emulated = str(machine["cpu"]).startswith("emulated")
    pairs = 0 if emulated else args.pairs
    results = {"machine": machine, "cpus": available_cpus(), "batch": BATCH,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "models": {}}  # fmt: skip
    # The float files: <id>.onnx, not their <id>-int8 / <id>-float16 twins.
    files = [p for p in sorted(args.models_dir.glob("*.onnx"))
             if not p.stem.endswith(("-int8", "-float16"))]  # fmt: skip
    for source in files:
        rows = results["models"][source.stem] = {}
        for name, scheme in schemes.items():
            rows[name] = row = measure(source, data, scheme, args.window_seconds, pairs)
            speed = row.get("speed_vs_float", {}).get("median")
            print(
                f"{source.stem} | {name} | top-1 {row['top1']:.4f} "
                f"(float {row['float32_top1']:.4f}) | agreement {row['agreement']:.4f} | "
                f"familiarity moved {row['familiarity_moved']:.4f} | self-check: "
                f"{row['self_check'] if row['self_check'] == 'holds' else 'fails'} | speed "
                + (
                    f"{speed:.2f}x float"
                    if speed
                    else "not measured" + (" (emulated CPU)" if emulated else " (--pairs 0)")
                ),
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=_plain))
    print(f"Machine: {machine}; wrote {args.out}")
    return 0


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
