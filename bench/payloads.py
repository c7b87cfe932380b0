"""python -m bench payloads: the payload log's cost, as throughput with it on against off.

Two `python -m service` (one worker each, every CPU for onnxruntime), the same model: one
with PAYLOAD_LOG unset, one logging --sample of its answered images (PAYLOAD_SAMPLE) into
a scratch folder, closing a shard every second (the default is five minutes: this is the
harsher case, and the counters are current when read). They run side by side and are
loaded in turn, never at once: --pairs pairs of closed-loop runs (off, then on; 8
clients, one PNG per request on /predict, for --seconds each, by `python -m bench.load`).
A warm-up run on each comes first, and each server goes first in every other pair.
Each pair gives a ratio of on's answered requests per second to off's, and of on's server
CPU time per answered request to off's (from /proc: less disturbed than throughput when
the machine is shared); the result is their medians, with the images the logged server
wrote and dropped (from its /metrics).
Writes <out>/payloads.{json,md}.
"""

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.modelfiles import model_files
from bench.procfs import cpu_seconds
from bench.results import write
from bench.servers import HOST, service_process
from service.config import available_cpus
from training.processes import run_python

CLIENTS = 8  # enough to keep one worker busy; more are shed at the door on 2 CPUs


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
            service_process(**common) as (off, off_process),
            service_process(**common, payload_log=log, payload_sample=args.sample,
                            payload_shard_seconds=1) as (on, on_process),
        ):  # fmt: skip
            runs = {"off": (off, off_process.pid), "on": (on, on_process.pid)}
            for port, pid in runs.values():  # warm-up, not counted: the first batches, and
                load(port, pid, 1.0)  # pyarrow's import when the first shard is written
            pairs = []
            for n in range(args.pairs):  # each goes first in every other pair
                order = ("off", "on") if n % 2 == 0 else ("on", "off")
                measured = {name: load(*runs[name], args.seconds) for name in order}
                pairs.append((measured["off"], measured["on"]))
            time.sleep(2)  # the last shard closes
            logged = payload_metrics(on)
    ratios = [b["rps"] / a["rps"] for a, b in pairs]
    cpu_ratios = [b["cpu_us_per_request"] / a["cpu_us_per_request"] for a, b in pairs]
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
        "cpu_ratios": [round(r, 4) for r in cpu_ratios],
        "median_cpu_ratio": round(statistics.median(cpu_ratios), 4),
        **logged,
    }
    write(results, args.out, "payloads", to_markdown)
    return 0


def load(port: int, pid: int, seconds: float) -> dict:
    before = cpu_seconds(pid)
    found = run_python(
        "-m", "bench.load", "--port", str(port), "--kind", "png",
        "--concurrency", str(CLIENTS), "--duration", str(seconds), timeout=seconds + 120,
    )  # fmt: skip
    used = cpu_seconds(pid) - before
    stats = json.loads(found.stdout)
    result = {key: stats[key] for key in ("rps", "p50_ms", "p99_ms", "shed", "errors")}
    # The server's CPU over the run (with its start and end) per request it answered.
    return {**result, "cpu_us_per_request": round(1e6 * used / max(stats["requests"], 1), 1)}


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
        f"**{results['median_ratio']:.3f}**, median ratio of server CPU per request on/off "
        f"**{results['median_cpu_ratio']:.3f}**; {results['images_logged']:.0f} images logged, "
        f"dropped {results['images_dropped']}",
        "",
        "| pair | off req/s | on req/s | on/off | off CPU µs/req | on CPU µs/req | on/off |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = zip(results["pairs"], results["ratios"], results["cpu_ratios"], strict=True)
    for n, (pair, ratio, cpu_ratio) in enumerate(rows):
        off, on = pair["off"], pair["on"]
        lines.append(f"| {n + 1} | {off['rps']} | {on['rps']} | {ratio:.3f} | "
                     f"{off['cpu_us_per_request']} | {on['cpu_us_per_request']} | "
                     f"{cpu_ratio:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
