"""python -m bench [run]: how close the service gets to what the hardware can do.

For each model, in one run on one machine (every number is a ratio within that run):
  1. ceiling    raw onnxruntime, one session on every CPU available, at batch 1, 8, 32
                and 128 (the headline: what the hardware does); the service's own session
                options (one worker's threads) beside it, for context
  2. service    `python -m service` (our server, with its limits) loaded from another
                process by 1, 8, 32 and 64 closed-loop clients on two paths: a PNG through
                /predict, and a raw tensor through the Open Inference Protocol (/v2,
                binary tensor data); micro-batching on, and off for context
  3. open loop  Poisson arrivals at 50, 80, 100 and 120 % of the closed-loop capacity
                just measured (64 clients): latency of the answered, and what was shed
  4. naive      Keras called per request inside a FastAPI route (bench/naive.py), with
                as many worker processes as the service
  5. peers      (--peers, opt-in) BentoML and LitServe serving the same ONNX file with the
                same thread budget, installed into their own virtual environments
Only 200s count as throughput; 503 (shed), other 4xx and errors have their own columns.
Writes <out>/results.json and results.md; prints the Markdown.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import peers as peer_servers
from bench.driver import closed_loop_rows, run_load
from bench.machine import describe_machine, machine_line
from bench.modelfiles import model_files
from bench.results import cell, write
from bench.servers import service_process, uvicorn_process
from service.classifier import Classifier
from service.config import Settings, available_cpus
from training.models import MODEL_IDS

BATCH_SIZES = (1, 8, 32, 128)
OPEN_LOOP_LOADS = (0.5, 0.8, 1.0, 1.2)  # of the closed-loop capacity at 64 clients
PATHS = {"png": "PNG, /predict", "v2": "tensor, /v2 binary"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs="+", default=list(MODEL_IDS), choices=MODEL_IDS)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument(
        "--workers", type=int, default=available_cpus(), help="service worker processes"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="per load run")
    parser.add_argument("--requests", type=int, default=50_000, help="cap per load run")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="per batch size")
    parser.add_argument("--peers", action="store_true", help="add BentoML and LitServe")
    parser.add_argument("--smoke", action="store_true", help="a few requests per row")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.seconds, args.requests, args.ceiling_seconds = 1.5, 24, 0.05
    settings = Settings(device=args.device, workers=args.workers)
    venvs = peer_servers.install_all(args.out / "peers") if args.peers else None  # untimed
    results: dict = {"machine": describe_machine(settings), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        models = model_files(args.models_dir, Path(scratch), args.models)
        for model_id, (path, weights) in models.items():
            print(f"== {model_id} ({weights})", flush=True)
            ceiling = measure_ceiling(path, settings, args.ceiling_seconds)
            service = measure_service(model_id, path, args, Path(scratch))
            app = ["--factory", "bench.naive:create_app", "--workers", str(args.workers)]
            with uvicorn_process(app, {"NAIVE_MODEL": model_id}) as port:
                naive = closed_loop_rows({"port": port, "kind": "png", "path": "/predict"}, args)
            peer_rows = peer_servers.measure_all(venvs, path, args) if venvs else {}
            results["models"][model_id] = summarise(weights, ceiling, service, naive, peer_rows)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    write(results, args.out, "results", to_markdown)
    return 0


def measure_ceiling(path: Path, settings: Settings, seconds: float) -> dict:
    """One session on every CPU available (the headline), and one with the service's
    session options (`onnx_threads` per worker), at each batch size."""
    all_cpus = Classifier(path, settings.device, available_cpus(), 1)
    per_worker = Classifier(path, settings.device, settings.onnx_threads, settings.inter_op_threads)
    result: dict = {"provider": all_cpus.provider}
    for name, model in (("all_cpus", all_cpus), ("per_worker", per_worker)):
        threads = available_cpus() if name == "all_cpus" else settings.onnx_threads
        rows: dict = {"threads": threads}
        for batch in BATCH_SIZES:
            ms = np.array(time_calls(model, batch, seconds)) * 1000
            rows[batch] = {
                "images_per_s": round(batch * len(ms) / (ms.sum() / 1000), 1),
                "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2),
            }
            print(f"  ceiling {name} batch {batch:>3}: {rows[batch]}", flush=True)
        result[name] = rows
    result["images_per_s"] = max(result["all_cpus"][b]["images_per_s"] for b in BATCH_SIZES)
    return result


def time_calls(model: Classifier, batch: int, seconds: float) -> list[float]:
    """Seconds per onnxruntime call on `batch` random images, for `seconds` (3 calls at least)."""
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    model.run(images)  # warm-up, not timed
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        model.run(images)
        times.append(time.perf_counter() - t)
    return times


def measure_service(model_id: str, path: Path, args: argparse.Namespace, scratch: Path) -> dict:
    """Closed loop on both paths with batching on and off; open loop with batching on."""
    service: dict = {"closed": {}, "open": {}}
    for batching in ("on", "off"):
        server = service_process(
            scratch / f"metrics-{model_id}-{batching}", models_dir=path.parent,
            default_model=model_id, batching=batching == "on", device=args.device,
            workers=args.workers,
        )  # fmt: skip
        with server as (port, process):
            for kind in PATHS:
                url = "/predict" if kind == "png" else f"/v2/models/{model_id}/infer"
                target = {"port": port, "kind": kind, "path": url, "pid": process.pid}
                rows = closed_loop_rows(target, args)
                service["closed"][f"{kind}, batching {batching}"] = rows
                if batching == "on":
                    capacity = max(rows[-1]["rps"], 1.0)
                    service["open"][kind] = [
                        {"load": load, **run_load(target, args, rate=capacity * load)}
                        for load in OPEN_LOOP_LOADS
                    ]
    return service


def summarise(weights: str, ceiling: dict, service: dict, naive: list, peers: dict) -> dict:
    """The model's rows, and the headline at 64 clients: share of the ceiling, CPU per
    request on each side, and the bound that CPU puts on the share."""
    best = ceiling["images_per_s"]
    at_64 = {name: rows[-1] for name, rows in service["closed"].items()}
    headline: dict = {
        "ceiling_images_per_s": best,
        "per_worker_ceiling_images_per_s": max(
            ceiling["per_worker"][b]["images_per_s"] for b in BATCH_SIZES
        ),
    }
    # CPU the ceiling spends per image: every thread busy for the whole call.
    ceiling_cpu_ms = ceiling["all_cpus"]["threads"] * 1000 / best
    headline["ceiling_cpu_ms_per_image"] = round(ceiling_cpu_ms, 3)
    for kind in PATHS:
        row = at_64[f"{kind}, batching on"]
        server_ms, client_ms = cpu_ms_per_request(row)
        headline[kind] = {
            "rps": row["rps"],
            "share_of_ceiling": round(row["rps"] / best, 3),
            "p99_ms": row["p99_ms"],
            "failed": row["shed"] + row["refused"] + row["errors"],
            "server_cpu_ms": server_ms,
            "client_cpu_ms": client_ms,
            # Server and generator share the CPUs the ceiling had to itself: the share of
            # the ceiling cannot pass this while each request costs what it cost here.
            "cpu_bound_share": round(ceiling_cpu_ms / (server_ms + client_ms), 3)
            if server_ms and client_ms
            else None,
        }
    headline["png"]["over_naive"] = round(at_64["png, batching on"]["rps"] / max(
        naive[-1]["rps"], 1e-9
    ), 1)  # fmt: skip
    if peers:
        headline["peers_rps"] = {name: p["rows"][-1]["rps"] for name, p in peers.items()}
    return {
        "weights": weights,
        "ceiling": ceiling,
        "service": service,
        "naive": naive,
        "peers": peers,
        "at_64_clients": headline,
    }


def cpu_ms_per_request(row: dict) -> tuple[float | None, float | None]:
    """(server, load generator) CPU milliseconds per answered request of a load row."""
    answered = max(row["requests"], 1)

    def per_request(key: str) -> float | None:
        return round(row[key] * 1000 / answered, 3) if row.get(key) is not None else None

    return per_request("server_cpu_s"), per_request("client_cpu_s")


def to_markdown(results: dict) -> str:
    """The run's tables, per model: ceiling, closed loop (service, peers, naive), open
    loop, and the headline sentences."""
    lines = [machine_line(results["machine"]), ""]
    for model_id, r in results["models"].items():
        c = r["ceiling"]
        best = c["images_per_s"]
        lines += [f"### {model_id} ({r['weights']}, {c['provider']})", ""]
        lines += [
            f"| onnxruntime: batch | {c['all_cpus']['threads']} threads (all CPUs): images/s "
            f"| p50 ms | p99 ms | {c['per_worker']['threads']} thread(s) (one worker): images/s "
            "| p50 ms | p99 ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for b in BATCH_SIZES:
            a, w = c["all_cpus"][b], c["per_worker"][b]
            lines.append(
                f"| {b} | {a['images_per_s']} | {a['p50_ms']} | {a['p99_ms']} "
                f"| {w['images_per_s']} | {w['p50_ms']} | {w['p99_ms']} |"
            )
        lines += [
            "",
            f"Closed loop (N clients, one request of one image in flight each); ceiling = "
            f"{best} images/s.",
            "",
            "| server | request | clients | answered req/s | of ceiling | p50 ms | p95 ms "
            "| p99 ms | shed (503) | refused (4xx) | errors | CPU ms/request: server "
            "| load generator |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        groups = []
        for name, rows in r["service"]["closed"].items():
            kind, batching = name.split(", ")
            groups.append((f"service, {batching}", PATHS[kind], rows))
        for name, peer in (r.get("peers") or {}).items():
            groups.append((f"{name} ({peer['settings']})", PATHS["png"], peer["rows"]))
        groups.append(("naive Keras", PATHS["png"], r["naive"]))
        for label, request, rows in groups:
            lines += [
                f"| {label} | {request} | {x['concurrency']} | {x['rps']} "
                f"| {x['rps'] / best:.0%} | {cell(x['p50_ms'])} | {cell(x['p95_ms'])} "
                f"| {cell(x['p99_ms'])} | {x['shed']} | {x['refused']} | {x['errors']} "
                f"| {' | '.join(cell(ms) for ms in cpu_ms_per_request(x))} |"
                for x in rows
            ]
        lines += [
            "",
            "Open loop (Poisson arrivals at a share of the 64-client capacity above; latency "
            "from the scheduled arrival, of the answered requests), batching on.",
            "",
            "| request | offered | offered req/s | sent | answered req/s | p50 ms | p99 ms "
            "| shed (503) | refused (4xx) | errors | unsent |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, rows in r["service"]["open"].items():
            lines += [
                f"| {PATHS[kind]} | {x['load']:.0%} | {x['rate']} | {x['sent']} | {x['rps']} "
                f"| {cell(x['p50_ms'])} | {cell(x['p99_ms'])} | {x['shed']} | {x['refused']} "
                f"| {x['errors']} | {x['unsent']} |"
                for x in rows
            ]
        h = r["at_64_clients"]
        v2, png = h["v2"], h["png"]
        sentence = (
            f"At 64 clients: binary tensors through /v2 {v2['rps']} req/s "
            f"({v2['share_of_ceiling']:.0%} of the all-CPU ceiling, p99 {v2['p99_ms']} ms, "
            f"{v2['failed']} not answered 200); PNG through /predict {png['rps']} req/s "
            f"({png['share_of_ceiling']:.0%}, p99 {png['p99_ms']} ms, {png['failed']} not "
            f"answered 200), {png['over_naive']}x the naive server with as many workers"
        )
        if h.get("peers_rps"):
            sentence += "; peers (PNG): " + ", ".join(
                f"{name} {rps} req/s" for name, rps in h["peers_rps"].items()
            )
        lines += ["", sentence + ".", ""]
        if v2.get("cpu_bound_share") and png.get("cpu_bound_share"):
            lines += [
                f"CPU per answered request at 64 clients: /v2 {v2['server_cpu_ms']} ms in the "
                f"server + {v2['client_cpu_ms']} ms in the load generator, /predict "
                f"{png['server_cpu_ms']} + {png['client_cpu_ms']} ms, against "
                f"{h['ceiling_cpu_ms_per_image']} ms per image at the ceiling: sharing the "
                f"CPUs, the share of the ceiling is bound by {v2['cpu_bound_share']:.0%} (/v2) "
                f"and {png['cpu_bound_share']:.0%} (/predict) at these costs per request.",
                "",
            ]
    return "\n".join(lines)
