"""python -m bench shadow: what shadowing a candidate costs live requests, latency with it
on against off.

Two `python -m service` (one worker each), each serving the same two versions of the model:
its file, and a copy with a different card (so a different version computing the same
outputs, as a retrain would cost). One pins the first version and shadows nothing; the
other shadows --share of its requests to the copy (ROLLOUT_FILE in its folder). They run
side by side and are loaded in turn, never at once: --pairs pairs of closed-loop runs (off,
then on; 8 clients, one PNG per request on /predict, for --seconds each, by
`python -m bench.load`), after a warm-up run on each; each server goes first in every other
pair. Each pair gives on's p50 and p99 latency and answered requests per second over
off's; the result is their medians, with the copies the shadowing server compared and shed
(from its /metrics): shed copies are the queue keeping the candidate's work off the live
path. Writes <out>/shadow.{json,md}.
"""

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import onnx
from prometheus_client.parser import text_string_to_metric_families

from bench.modelfiles import model_files
from bench.payloads import CLIENTS, load
from bench.results import write
from bench.servers import HOST, service_process
from contract.classifier import file_version
from service.config import available_cpus

MEASURES = ("p50_ms", "p99_ms", "rps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(seconds=10.0)
    parser.add_argument("--pairs", type=int, default=3, help="off/on pairs of runs")
    parser.add_argument("--share", type=float, default=1.0, help="of requests shadowed when on")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as scratch:
        path, weights = model_files(args.models_dir, Path(scratch), [args.model])[args.model]
        serving, candidate = path, path.with_name(f"{args.model}-candidate.onnx")
        another_version(serving, candidate)
        folders = {}
        shadowing = {"candidate": file_version(candidate), "mode": "shadow", "share": args.share}
        for name, plan in (("off", {}), ("on", shadowing)):
            folder = Path(scratch) / name
            folder.mkdir()
            for file in (serving, candidate):
                (folder / file.name).write_bytes(file.read_bytes())
            rollout = {"models": {args.model: {"serving": file_version(serving), **plan}}}
            (folder / "rollout.json").write_text(json.dumps(rollout))
            folders[name] = folder
        common = dict(default_model=args.model, workers=1)
        with (
            service_process(models_dir=folders["off"], **common) as (off, off_process),
            service_process(models_dir=folders["on"], **common) as (on, on_process),
        ):
            runs = {"off": (off, off_process.pid), "on": (on, on_process.pid)}
            for port, pid in runs.values():  # warm-up, not counted
                load(port, pid, 1.0)
            pairs = []
            for n in range(args.pairs):  # each goes first in every other pair
                order = ("off", "on") if n % 2 == 0 else ("on", "off")
                measured = {name: load(*runs[name], args.seconds) for name in order}
                pairs.append((measured["off"], measured["on"]))
            time.sleep(1)  # the last copies are compared
            shadowed = shadow_metrics(on)
    ratios = {m: [b[m] / a[m] for a, b in pairs if a[m]] for m in MEASURES}
    results = {
        "model": args.model,
        "weights": weights,
        "cpus_available": available_cpus(),
        "share": args.share,
        "seconds": args.seconds,
        "clients": CLIENTS,
        "pairs": [{"off": a, "on": b} for a, b in pairs],
        "median_ratios": {m: round(statistics.median(r), 4) for m, r in ratios.items() if r},
        **shadowed,
    }
    write(results, args.out, "shadow", to_markdown)
    return 0


def another_version(source: Path, target: Path) -> None:
    """The same graph and weights with a different card: another version of the model."""
    model = onnx.load(source)
    for prop in model.metadata_props:
        if prop.key == "training":
            training = json.loads(prop.value)
            training["trained_at"] = "1970-01-01T00:00:00Z"  # never the newest
            prop.value = json.dumps(training)
            break
    else:
        model.metadata_props.add(key="training", value=json.dumps({"trained_at": "1970"}))
    onnx.save(model, target)


def shadow_metrics(port: int) -> dict:
    """The shadowing server's copies: compared, agreed, shed by reason, failed."""
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30).read().decode()
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def total(name: str) -> float:
        return sum(s.value for s in samples if s.name == name)

    shed: dict[str, float] = {}
    for s in samples:
        if s.name == "shadow_images_shed_total":
            shed[s.labels["reason"]] = shed.get(s.labels["reason"], 0.0) + s.value
    return {
        "images_compared": total("shadow_images_compared_total"),
        "images_agreed": total("shadow_images_agreed_total"),
        "images_shed": shed,
        "candidate_errors": total("shadow_candidate_errors_total"),
    }


def to_markdown(results: dict) -> str:
    median = results["median_ratios"]
    lines = [
        f"Shadowing on (share {results['share']}) against off, {results['model']} "
        f"({results['weights']}), one worker each, {results['cpus_available']} CPUs, "
        f"{results['clients']} clients on /predict, {results['seconds']} s per run: median "
        f"ratios on/off p50 **{median.get('p50_ms', float('nan')):.3f}**, p99 "
        f"**{median.get('p99_ms', float('nan')):.3f}**, requests/s "
        f"**{median.get('rps', float('nan')):.3f}**; {results['images_compared']:.0f} "
        f"images compared ({results['images_agreed']:.0f} agreed), shed "
        f"{results['images_shed']}, candidate errors {results['candidate_errors']:.0f}",
        "",
        "| pair | off p50 ms | on p50 ms | off p99 ms | on p99 ms | off req/s | on req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, pair in enumerate(results["pairs"]):
        off, on = pair["off"], pair["on"]
        lines.append(f"| {n + 1} | {off['p50_ms']} | {on['p50_ms']} | {off['p99_ms']} | "
                     f"{on['p99_ms']} | {off['rps']} | {on['rps']} |")  # fmt: skip
    return "\n".join(lines) + "\n"
