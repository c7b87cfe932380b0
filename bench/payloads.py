"""python -m bench payloads: the payload log's cost, as throughput with it on against off.

Two `python -m service` (one worker each, every CPU for onnxruntime), the same model: one
with PAYLOAD_LOG unset, one logging --sample of its answered images (PAYLOAD_SAMPLE) into
a scratch folder, closing a shard every second (the default is five minutes: this is the
harsher case, and the counters are current when read). They run side by side and are
loaded in turn, never at once: --pairs pairs of closed-loop runs (off, then on; 32
clients, one PNG per request on /predict, for --seconds each, by `python -m bench.load`).
Each pair gives a ratio of on's answered requests per second to off's; the result is
their median, with the images the logged server wrote and dropped (from its /metrics).
Writes <out>/payloads.{json,md}.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.modelfiles import model_files
from bench.results import write
from bench.servers import HOST, service_process
from service.config import available_cpus

CLIENTS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(seconds=10.0)
    parser.add_argument("--pairs", type=int, default=3, help="off/on pairs of runs")
    parser.add_argument("--sample", type=float, default=0.1, help="PAYLOAD_SAMPLE when on")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-payloads-") as scratch:
        path, weights = model_files(args.models_dir, Path(scratch), [args.model])[args.model]
        common = dict(models_dir=path.parent, default_model=args.model, workers=1)
        log = Path(scratch) / "payloads"
        with (
            service_process(**common) as (off, _),
            service_process(**common, payload_log=log, payload_sample=args.sample,
                            payload_shard_seconds=1) as (on, _),
        ):  # fmt: skip
            pairs = [(load(off, args.seconds), load(on, args.seconds)) for _ in range(args.pairs)]
            time.sleep(2)  # the last shard closes
            logged = payload_metrics(on)
    ratios = [b["rps"] / a["rps"] for a, b in pairs]
    results = {
        "model": args.model,
        "weights": weights,
        "cpus_available": available_cpus(),
        "sample": args.sample,
        "seconds": args.seconds,
        "clients": CLIENTS,
        "pairs": [{"off": a, "on": b} for a, b in pairs],
        "ratios": [round(r, 4) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 4),
        **logged,
    }
    write(results, args.out, "payloads", to_markdown)
    return 0


def load(port: int, seconds: float) -> dict:
    found = subprocess.run(
        [sys.executable, "-m", "bench.load", "--port", str(port), "--kind", "png",
         "--concurrency", str(CLIENTS), "--duration", str(seconds)],
        capture_output=True, text=True, check=True, timeout=seconds + 120,
    )  # fmt: skip
    stats = json.loads(found.stdout)
    return {key: stats[key] for key in ("rps", "p50_ms", "p99_ms", "shed", "errors")}


def payload_metrics(port: int) -> dict:
    """The logged server's payload counters (logged so far, dropped by reason)."""
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30).read().decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return {
        "images_logged": sum(s.value for s in samples if s.name == "payload_images_logged_total"),
        "images_dropped": {
            s.labels["reason"]: s.value for s in samples if s.name == "payload_images_dropped_total"
        },
    }


def to_markdown(results: dict) -> str:
    lines = [
        f"Payload log on (PAYLOAD_SAMPLE={results['sample']}) against off, "
        f"{results['model']} ({results['weights']}), one worker each, "
        f"{results['cpus_available']} CPUs, {results['clients']} clients on /predict, "
        f"{results['seconds']} s per run: median throughput ratio on/off "
        f"**{results['median_ratio']:.3f}**; {results['images_logged']:.0f} images logged, "
        f"dropped {results['images_dropped']}",
        "",
        "| pair | off req/s | on req/s | on/off | off p99 ms | on p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for n, (pair, ratio) in enumerate(zip(results["pairs"], results["ratios"], strict=True)):
        off, on = pair["off"], pair["on"]
        lines.append(f"| {n + 1} | {off['rps']} | {on['rps']} | {ratio:.3f} | {off['p99_ms']} | "
                     f"{on['p99_ms']} |")  # fmt: skip
    return "\n".join(lines) + "\n"
