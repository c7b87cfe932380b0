"""python -m bench: how close the service gets to what the hardware can do.

For each model, in one run on one machine:
  1. ceiling   raw onnxruntime at batch sizes 1, 8, 32, 128, with the service's session options
  2. service   the real app under uvicorn, loaded by concurrent clients from another process,
               micro-batching on and off
  3. naive     Keras called per request inside a FastAPI route (bench/naive.py)
Writes bench-results/results.json and results.md; prints the Markdown.
"""

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.classifier import Classifier
from service.config import Settings, available_cpus
from training.models import MODEL_IDS

BATCH_SIZES = (1, 8, 32, 128)
CONCURRENCY = (1, 8, 32, 64)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(device=args.device, workers=args.workers)
    results = {"machine": describe_machine(settings), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        for model_id, (path, weights) in model_files(args.models_dir, Path(scratch)).items():
            print(f"== {model_id} ({weights})", flush=True)
            ceiling = measure_ceiling(path, settings, args.ceiling_seconds)
            service = {}
            for mode in ("batching on", "batching off"):
                metrics_dir = Path(scratch) / f"metrics-{model_id}-{mode.replace(' ', '-')}"
                metrics_dir.mkdir()
                env = {
                    "MODELS_DIR": str(path.parent), "DEFAULT_MODEL": model_id,
                    "BATCHING": str(mode == "batching on").lower(), "DEVICE": args.device,
                    "LOG_LEVEL": "WARNING", "WEB_CONCURRENCY": str(args.workers),
                    "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                }  # fmt: skip
                service[mode] = load_server(["--factory", "service.main:create_app"], env, args)
            naive = load_server(
                ["--factory", "bench.naive:create_app"], {"NAIVE_MODEL": model_id}, args
            )
            results["models"][model_id] = summarise(weights, ceiling, service, naive)
    write(results, args.out)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument(
        "--workers", type=int, default=available_cpus(), help="service worker processes"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="per load run")
    parser.add_argument("--requests", type=int, default=50_000, help="cap per load run")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="per batch size")
    parser.add_argument("--smoke", action="store_true", help="a few requests per row")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.requests, args.ceiling_seconds = 2.0, 24, 0.05
    return args


def model_files(models_dir: Path, work: Path) -> dict[str, tuple[Path, str]]:
    """Each model's ONNX file, alone in a folder; untrained exports where none was trained.

    Speed does not depend on the weights, so a missing model is exported untrained."""
    files = {}
    for model_id in MODEL_IDS:
        folder = work / model_id
        folder.mkdir(parents=True, exist_ok=True)
        trained = Path(models_dir) / f"{model_id}.onnx"
        target = folder / trained.name
        if trained.exists():
            target.write_bytes(trained.read_bytes())
            files[model_id] = (target, "trained weights")
        else:
            export_untrained(model_id, target)
            files[model_id] = (target, "untrained weights (speed only)")
    return files


def export_untrained(model_id: str, path: Path) -> None:
    from service.modelcard import ModelCard
    from training.export import export
    from training.models import build_model

    model = build_model(model_id)
    card = ModelCard(
        model_id=model_id,
        class_names=[f"class_{i}" for i in range(100)],
        superclass_names=[f"superclass_{i}" for i in range(20)],
        fine_to_coarse=[i % 20 for i in range(100)],
        parameter_count=model.count_params(),
        training={"source": "untrained, for benchmarks only"},
    )
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    export(model, card, path, images)


def describe_machine(settings: Settings) -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpus_available": available_cpus(),
        "onnxruntime": ort.__version__,
        "onnx_threads": settings.onnx_threads,
        "workers": settings.workers,
        "python": platform.python_version(),
    }


def measure_ceiling(path: Path, settings: Settings, seconds: float) -> dict:
    model = Classifier(path, settings.device, settings.onnx_threads, settings.inter_op_threads)
    rows = {"provider": model.provider}
    for batch in BATCH_SIZES:
        ms = np.array(time_calls(model, batch, seconds)) * 1000
        rows[batch] = {
            "images_per_s": round(batch * len(ms) / (ms.sum() / 1000), 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
        }
        print(f"  ceiling batch {batch:>3}: {rows[batch]}", flush=True)
    rows["threads"] = settings.onnx_threads
    # For reference: one session on every CPU, the most this machine does at batch 128.
    if settings.onnx_threads != available_cpus():
        everything = Classifier(path, settings.device, available_cpus(), 1)
        times = time_calls(everything, 128, seconds)
        rows["all_cpus_images_per_s"] = round(128 * len(times) / sum(times), 1)
    else:
        rows["all_cpus_images_per_s"] = rows[128]["images_per_s"]
    return rows


def time_calls(model: Classifier, batch: int, seconds: float) -> list[float]:
    """Seconds per predict call on `batch` random images, for `seconds` (3 calls at least)."""
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    model.predict(images)  # warm-up, not timed
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        model.predict(images)
        times.append(time.perf_counter() - t)
    return times


def load_server(app_args: list[str], env: dict[str, str], args: argparse.Namespace) -> list[dict]:
    """Start uvicorn with `app_args`, load it at every concurrency, stop it."""
    with uvicorn_process(app_args, env) as port:
        rows = []
        for concurrency in CONCURRENCY:
            command = [
                sys.executable, "-m", "bench.load", "--port", str(port),
                "--concurrency", str(concurrency), "--duration", str(args.seconds),
                "--requests", str(max(args.requests, concurrency)),
            ]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out))
            print(f"  {app_args[-1]} {env.get('BATCHING', '')}: {rows[-1]}", flush=True)
        return rows


@contextlib.contextmanager
def uvicorn_process(app_args: list[str], env: dict[str, str]):
    """`python -m uvicorn APP_ARGS` on a free loopback port, ready; yields the port."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", *app_args, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    with server_process(command, env, port):
        yield port


@contextlib.contextmanager
def service_process(env: dict[str, str]):
    """`python -m service` (our server, with its limits) on a free loopback port, ready;
    yields (port, process), so a test can signal it."""
    port = free_port()
    env = {"HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "WARNING", **env}
    with server_process([sys.executable, "-m", "service"], env, port) as process:
        yield port, process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(command: list[str], env: dict[str, str], port: int):
    process = subprocess.Popen(command, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {command} did not become ready")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=1)
                break
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=60)


def summarise(weights: str, ceiling: dict, service: dict, naive: list[dict]) -> dict:
    best = max(ceiling[b]["images_per_s"] for b in BATCH_SIZES)
    at_64 = {mode: rows[-1] for mode, rows in service.items()}
    rps = at_64["batching on"]["rps"]
    return {
        "weights": weights,
        "ceiling": ceiling,
        "service": service,
        "naive": naive,
        "at_64_clients": {
            "batched_ceiling_images_per_s": best,
            "service_share_of_ceiling": round(rps / best, 3),
            "all_cpus_images_per_s": ceiling["all_cpus_images_per_s"],
            "service_share_of_all_cpus": round(rps / ceiling["all_cpus_images_per_s"], 3),
            "service_p99_ms": at_64["batching on"]["p99_ms"],
            "service_errors": at_64["batching on"]["errors"],
            "service_over_naive": round(rps / max(naive[-1]["rps"], 1e-9), 1),
        },
    }


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    markdown = to_markdown(results)
    (out / "results.md").write_text(markdown)
    print(markdown)


def to_markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpus_available']} CPUs available ({m['cores']} cores), "
        f"onnxruntime {m['onnxruntime']}, Python {m['python']}; service: {m['workers']} "
        f"worker(s) x {m['onnx_threads']} intra-op thread(s).",
        "",
    ]
    for model_id, r in results["models"].items():
        lines += [f"### {model_id} ({r['weights']}, {r['ceiling']['provider']})", ""]
        lines += [
            f"| ceiling, {r['ceiling']['threads']} thread(s): batch | images/s | p50 ms | p99 ms |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {b} | {r['ceiling'][b]['images_per_s']} | {r['ceiling'][b]['p50_ms']} "
            f"| {r['ceiling'][b]['p99_ms']} |"
            for b in BATCH_SIZES
        ]
        lines += ["", "| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for name, rows in [*r["service"].items(), ("naive Keras", r["naive"])]:
            label = f"service, {name}" if name != "naive Keras" else name
            lines += [
                f"| {label} | {x['concurrency']} | {x['rps']} | {x['p50_ms']} | {x['p95_ms']} "
                f"| {x['p99_ms']} | {x['errors']} |"
                for x in rows
            ]
        s = r["at_64_clients"]
        lines += [
            "",
            f"At 64 clients: {s['service_share_of_ceiling']:.0%} of the batched ceiling "
            f"({s['batched_ceiling_images_per_s']} images/s with the service's session "
            f"options; {s['service_share_of_all_cpus']:.0%} of the {s['all_cpus_images_per_s']} "
            f"images/s one session reaches on all CPUs), p99 {s['service_p99_ms']} ms, "
            f"{s['service_errors']} errors, {s['service_over_naive']}x the naive server.",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
