"""python -m bench: how close the service gets to what the hardware can do.

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
`python -m bench faults` is the fault-and-load mode (bench/faults.py); `python -m bench
profile` shows where each request's microseconds go (bench/profile.py, needs py-spy).
Writes <out>/results.json and results.md; prints the Markdown.
"""

import argparse
import contextlib
import json
import os
import platform
import signal
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
OPEN_LOOP_LOADS = (0.5, 0.8, 1.0, 1.2)  # of the closed-loop capacity at 64 clients
PATHS = {"png": "PNG, /predict", "v2": "tensor, /v2 binary"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["faults"]:
        from bench.faults import main as faults

        return faults(argv[1:])
    if argv[:1] == ["profile"]:
        from bench.profile import main as profile

        return profile(argv[1:])
    args = parse_args(argv)
    settings = Settings(device=args.device, workers=args.workers)
    peers = None
    if args.peers:
        from bench import peers as peer_module

        peers = peer_module.install_all(args.out / "peers")  # before any timing
    results = {"machine": describe_machine(settings), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        models = model_files(args.models_dir, Path(scratch), args.models)
        for model_id, (path, weights) in models.items():
            print(f"== {model_id} ({weights})", flush=True)
            ceiling = measure_ceiling(path, settings, args.ceiling_seconds)
            service = measure_service(model_id, path, args, Path(scratch))
            naive = load_server(
                ["--factory", "bench.naive:create_app", "--workers", str(args.workers)],
                {"NAIVE_MODEL": model_id},
                args,
            )
            peer_rows = {}
            if peers is not None:
                from bench import peers as peer_module

                peer_rows = peer_module.measure_all(peers, path, args)
            results["models"][model_id] = summarise(weights, ceiling, service, naive, peer_rows)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    write(results, args.out)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
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
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.requests, args.ceiling_seconds = 1.5, 24, 0.05
    return args


def model_files(
    models_dir: Path, work: Path, model_ids: list[str] | tuple[str, ...] = MODEL_IDS
) -> dict[str, tuple[Path, str]]:
    """Each model's ONNX file, alone in a folder; untrained exports where none was trained.

    Speed does not depend on the weights, so a missing model is exported untrained."""
    files = {}
    for model_id in model_ids:
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
    info = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    return {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "cpus_available": available_cpus(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "onnx_threads": settings.onnx_threads,
        "workers": settings.workers,
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
    }


def measure_ceiling(path: Path, settings: Settings, seconds: float) -> dict:
    """One session on every CPU available (the headline), and one with the service's
    session options (`onnx_threads` per worker), at each batch size."""
    all_cpus = Classifier(path, settings.device, available_cpus(), 1)
    per_worker = Classifier(path, settings.device, settings.onnx_threads, settings.inter_op_threads)
    result = {"provider": all_cpus.provider}
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


def measure_service(model_id: str, path: Path, args: argparse.Namespace, scratch: Path) -> dict:
    """Closed loop on both paths with batching on and off; open loop with batching on."""
    service: dict = {"closed": {}, "open": {}}
    for batching in ("on", "off"):
        metrics_dir = scratch / f"metrics-{model_id}-{batching}"
        metrics_dir.mkdir()
        env = {
            "MODELS_DIR": str(path.parent), "DEFAULT_MODEL": model_id,
            "BATCHING": str(batching == "on").lower(), "DEVICE": args.device,
            "WEB_CONCURRENCY": str(args.workers), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }  # fmt: skip
        with service_process(env) as (port, process):
            for kind in PATHS:
                url = "/predict" if kind == "png" else f"/v2/models/{model_id}/infer"
                target = {"port": port, "kind": kind, "path": url, "pid": process.pid}
                rows = [run_load(target, args, concurrency=c) for c in CONCURRENCY]
                service["closed"][f"{kind}, batching {batching}"] = rows
                if batching == "on":
                    capacity = max(rows[-1]["rps"], 1.0)
                    service["open"][kind] = [
                        {"load": load, **run_load(target, args, rate=capacity * load)}
                        for load in OPEN_LOOP_LOADS
                    ]
    return service


def run_load(target: dict, args: argparse.Namespace, **mode) -> dict:
    """One `python -m bench.load` run against `target` (port, kind, path[, field])."""
    command = [
        sys.executable, "-m", "bench.load", "--port", str(target["port"]),
        "--kind", target["kind"], "--path", target["path"],
        "--field", target.get("field", "files"), "--duration", str(args.seconds),
    ]  # fmt: skip
    if "rate" in mode:
        command += ["--rate", str(mode["rate"]), "--requests", str(args.requests)]
    else:
        concurrency = mode["concurrency"]
        command += ["--concurrency", str(concurrency)]
        command += ["--requests", str(max(args.requests, concurrency))]
    from bench.faults import cpu_seconds  # the server and its workers, from /proc

    server = target.get("pid")
    server_cpu = cpu_seconds(server) if server else None
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    row = json.loads(out)
    if server_cpu is not None:
        row["server_cpu_s"] = round(cpu_seconds(server) - server_cpu, 3)
    print(f"  {target['kind']} {target['path']} {mode}: {row}", flush=True)
    return row


def load_server(app_args: list[str], env: dict[str, str], args: argparse.Namespace) -> list[dict]:
    """Start uvicorn with `app_args`, load /predict at every concurrency, stop it."""
    with uvicorn_process(app_args, env) as port:
        target = {"port": port, "kind": "png", "path": "/predict"}
        return [run_load(target, args, concurrency=c) for c in CONCURRENCY]


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
def server_process(
    command: list[str],
    env: dict[str, str],
    port: int,
    ready_path: str = "/health/ready",
    timeout: float = 120,
    cwd: Path | None = None,
):
    # Its own process group: whatever it spawns (workers, peers' helpers) is stopped with it.
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=cwd, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {command} did not become ready")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1)
                break
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):  # what it left behind
            os.killpg(process.pid, signal.SIGKILL)


def summarise(weights: str, ceiling: dict, service: dict, naive: list, peers: dict) -> dict:
    best = ceiling["images_per_s"]
    at_64 = {name: rows[-1] for name, rows in service["closed"].items()}
    headline = {
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


def write(results: dict, out: Path, name: str = "results", markdown_of=None) -> None:
    """`out/NAME.json` and `out/NAME.md`, and the Markdown on stdout (every mode's ending)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    markdown = (markdown_of or to_markdown)(results)
    (out / f"{name}.md").write_text(markdown)
    print(markdown)


def machine_line(m: dict) -> str:
    flags = ", ".join(m["cpu_flags"]) or "none of " + "/".join(CPU_FLAGS[:2])
    load = "/".join(f"{x:.2f}" for x in m["load_average_start"][:1] + m.get(
        "load_average_end", [float("nan")])[:1])  # fmt: skip
    return (
        f"Machine: {m['cpu']} ({flags}), {m['cpus_available']} CPUs available "
        f"({m['cores']} cores), onnxruntime {m['onnxruntime']}, Python {m['python']}; service: "
        f"{m['workers']} worker(s) x {m['onnx_threads']} onnxruntime thread(s); load generator "
        f"on the same CPUs; 1-minute load average at start/end {load}."
    )


def _cell(value) -> str:
    return "-" if value is None else str(value)


def to_markdown(results: dict) -> str:
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
                f"| {x['rps'] / best:.0%} | {_cell(x['p50_ms'])} | {_cell(x['p95_ms'])} "
                f"| {_cell(x['p99_ms'])} | {x['shed']} | {x['refused']} | {x['errors']} "
                f"| {' | '.join(_cell(ms) for ms in cpu_ms_per_request(x))} |"
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
                f"| {_cell(x['p50_ms'])} | {_cell(x['p99_ms'])} | {x['shed']} | {x['refused']} "
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


if __name__ == "__main__":
    sys.exit(main())
