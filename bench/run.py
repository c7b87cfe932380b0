"""python -m bench [run]: how close the service gets to what the hardware can do.

For each model, in one run on one machine (every number is a ratio within that run):
  1. ceiling    raw onnxruntime, one session on every CPU available, at batch 1, 8, 32
                and 128 (the headline: what the hardware does); the service's own session
                options (one worker's threads) beside it, for context. Then, between every
                two service rows below, a short window of the all-CPU session at its best
                batch: each row's ratio is to the windows just before and after it
  2. service    `python -m service` (our server, with its limits) loaded from another
                process by 1, 8, 32 and 64 closed-loop clients on four paths: a PNG
                through /predict, the same PNG as the Open Inference Protocol's BYTES
                input (/v2, binary data), a raw tensor through /v2 (binary tensor data),
                and the same tensor over gRPC (ModelInfer, raw contents); /v2 with 8
                and 32 images a request, as many clients as keep IMAGES_IN_FLIGHT
                images in flight (at least 2 requests a worker);
                micro-batching on, and off for context
  3. open loop  Poisson arrivals at 50, 80, 100, 120 and 200 % of the 64-client capacity
                just measured: answered latency from the scheduled arrival, goodput, what
                was shed and how fast; the latency-throughput curve as a picture
  4. int8       where `<id>-int8.onnx` lies beside the model (or `--int8 quantize`): its
                ceiling beside the float one's (their ratio from alternating windows) and
                the service's 64-client and many-image rows on it
  5. naive      Keras called per request inside a FastAPI route (bench/naive.py), with
                as many worker processes as the service
  6. peers      (--peers, opt-in) BentoML and LitServe serving the same ONNX file with the
                same thread budget, installed into their own virtual environments
The judged rows (64 clients, many images, open loop, int8) run --repeats times in passes,
each run with its own adjacent ceiling; a row reports the median and spread of its runs,
and the targets (bench/targets.py) are judged on the median. Only 200s count as
throughput; 503 (shed), other 4xx and errors have their own columns.
Writes <out>/results.json and results.md and <out>/latency-curve.png (a full run also
<out>/published/latency-curve.png, the copy kept in git); prints the Markdown.
"""

import argparse
import json
import math
import os
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import curve
from bench import peers as peer_servers
from bench.bounds import bounded, measure_floor
from bench.ceiling import Windows, ceiling_session, measure_table
from bench.driver import CONCURRENCY, run_load
from bench.int8 import MODES as INT8_MODES
from bench.int8 import int8_file
from bench.machine import describe_machine
from bench.modelfiles import model_files
from bench.results import write
from bench.servers import HOST, free_port, service_process, uvicorn_process
from bench.steady import Interleaved, Row, goodput_of_capacity, ratio_windows
from bench.tables import PATHS, to_markdown
from bench.targets import CLOSED_SHARE, judge_closed, judge_images, judge_open
from service.config import Settings, available_cpus
from training.errors import ExportError
from training.models import MODEL_IDS

OPEN_LOOP_LOADS = (0.5, 0.8, 1.0, 1.2, 2.0)  # of the closed-loop capacity at 64 clients
HEADLINE_CLIENTS = 64  # the closed-loop row that is judged, repeated, and is the capacity
IMAGES_PER_REQUEST = (8, 32)  # /v2 binary rows of many images a request
IMAGES_IN_FLIGHT = 64  # as the 64 one-image clients
SMOKE = {"seconds": 1.0, "requests": 24, "ceiling_seconds": 0.05, "window_seconds": 0.05,
         "repeats": 2}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--models", nargs="+", default=list(MODEL_IDS), choices=MODEL_IDS)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument(
        "--workers", type=int, default=available_cpus(), help="service worker processes"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per load run")
    parser.add_argument("--requests", type=int, default=50_000, help="cap per load run")
    parser.add_argument(
        "--ceiling-seconds", type=float, default=2.0, help="per batch size of the ceiling table"
    )
    parser.add_argument(
        "--window-seconds", type=float, default=1.0, help="per ceiling window between rows"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each judged row (median and spread)"
    )
    parser.add_argument(
        "--int8",
        default="auto",
        choices=INT8_MODES,
        help="auto: measure <id>-int8.onnx where it is in --models-dir; quantize: quantize "
        "the float file when it is not; off",
    )
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        type=setting,
        help="a service setting (a Settings field) for every service process of the run, e.g. "
        "max_queue_delay_ms=80; repeatable; recorded with the results",
    )
    parser.add_argument("--peers", action="store_true", help="add BentoML and LitServe")
    parser.add_argument("--smoke", action="store_true", help="a few requests per row")


# Settings the harness sets itself (or has its own option for).
OWN_SETTINGS = {"device", "workers", "models_dir", "default_model", "batching", "host", "port",
                "grpc_port", "log_level"}  # fmt: skip


def setting(text: str) -> tuple[str, str]:
    """FIELD=VALUE, FIELD a service setting the harness does not set itself."""
    field, sep, value = text.partition("=")
    if not sep or field not in Settings.model_fields or field in OWN_SETTINGS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected FIELD=VALUE, FIELD a Settings field other than "
            f"{', '.join(sorted(OWN_SETTINGS))}"
        )
    return field, value


def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if args.smoke:
        vars(args).update(SMOKE)
    args.service_settings = dict(args.setting)
    settings = Settings(**args.service_settings, device=args.device, workers=args.workers)
    venvs = peer_servers.install_all(args.out / "peers") if args.peers else None  # untimed
    results: dict = {
        "machine": describe_machine(settings),
        "run": {k: vars(args)[k] for k in ("seconds", "requests", "ceiling_seconds",
                                           "window_seconds", "repeats", "int8", "smoke")},
    }  # fmt: skip
    # What the service runs with: its defaults but for what service_process sets (the
    # queue bound and the batcher's settings are what the open loop is judging).
    secret = {"api_keys", "api_keys_file", "metrics_token"}
    results["run"]["service_settings"] = settings.model_dump(mode="json", exclude=secret)
    results["run"]["settings_given"] = args.service_settings
    results["models"] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        # The serving path's floor, once: the same for every model.
        results["floor"] = measure_floor(args, Path(scratch), HEADLINE_CLIENTS, targets_of)
        args.floor = {kind: row["rps"] for kind, row in results["floor"].items()}
        models = model_files(args.models_dir, Path(scratch), args.models)
        for model_id, (path, weights) in models.items():
            print(f"== {model_id} ({weights})", flush=True)
            results["models"][model_id] = measure_model(
                model_id, path, weights, args, settings, venvs, Path(scratch)
            )
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["run"]["duration_s"] = round(time.monotonic() - started, 1)
    pictures = [args.out / "latency-curve.png"]
    if not args.smoke:  # the copy kept in git: never a smoke run's
        pictures.append(args.out / "published" / "latency-curve.png")
    results["run"]["curve"] = [str(p) for p in pictures]
    curve.write(
        {m: r["service"]["open"] for m, r in results["models"].items()},
        curve_title(results),
        *pictures,
    )
    write(results, args.out, "results", to_markdown)
    return 0


def curve_title(results: dict) -> str:
    m, run = results["machine"], results["run"]
    return (
        f"Open loop (Poisson arrivals), batching on; median of {run['repeats']} runs, bars "
        f"min-max{' (smoke run)' if run['smoke'] else ''}; {m['cpu']}, {m['cpus_available']} "
        f"CPUs, {m['workers']} worker(s)"
    )


def measure_model(
    model_id: str,
    path: Path,
    weights: str,
    args: argparse.Namespace,
    settings: Settings,
    venvs: dict | None,
    scratch: Path,
) -> dict:
    """Every table of one model: ceilings (float, int8 where there is one), the service
    on the float file, the naive server, the peers, the service on the int8 file."""
    ceiling = measure_table(path, settings, args.ceiling_seconds)
    session = ceiling_session(path, args.device, ceiling)
    threads = ceiling["all_cpus"]["threads"]
    windows: list[Windows] = []

    def interleaved(label: str, model=session, batch=ceiling["best_batch"]) -> Interleaved:
        windows.append(Windows(model, batch, args.window_seconds, label))
        return Interleaved(windows[-1], threads)

    result: dict = {"weights": weights, "ceiling": ceiling, "int8": None}
    try:
        int8 = int8_file(args.models_dir, scratch, model_id, path, args.int8)
    except ExportError as err:  # quantized here, and its gate refused it: no int8 rows
        print(f"  no int8 file: {err}", flush=True)
        int8, result["int8_refused"] = None, str(err)
    if int8 is not None:
        int8_path, source = int8
        int8_ceiling = measure_table(int8_path, settings, args.ceiling_seconds)
        int8_session = ceiling_session(int8_path, args.device, int8_ceiling)
        int8_windows = Windows(int8_session, int8_ceiling["best_batch"], args.window_seconds,
                               "int8 ceiling, alternating with float")  # fmt: skip
        float_windows = Windows(session, ceiling["best_batch"], args.window_seconds,
                                "float ceiling, alternating with int8")  # fmt: skip
        ratio = ratio_windows(int8_windows, float_windows, args.repeats)
        windows += [float_windows, int8_windows]
        print(f"  int8/float ceiling: {ratio}", flush=True)
        result["int8"] = {"weights": source, "ceiling": int8_ceiling, "ratio_to_float": ratio}

    result["service"] = measure_service(model_id, path, args, scratch, interleaved)
    app = ["--factory", "bench.naive:create_app", "--workers", str(args.workers)]
    with uvicorn_process(app, {"NAIVE_MODEL": model_id}) as port:
        target = {"port": port, "kind": "png", "path": "/predict"}
        result["naive"] = interleaved("naive Keras").run_passes(closed_loop(target, args, 1))
    result["peers"] = {}
    if venvs:
        result["peers"] = peer_servers.measure_all(
            venvs, path, args,
            lambda name, target: interleaved(name).run_passes(closed_loop(target, args, 1)),
        )  # fmt: skip
    if int8 is not None:
        int8_id = int8_session.model_id  # the id its card gives, which the v2 path names
        result["int8"]["service"] = measure_int8_service(
            int8_id, int8_path, args, scratch,
            lambda label: interleaved(label, int8_session, int8_ceiling["best_batch"]),
        )  # fmt: skip
    result["windows"] = [w.summary() for w in windows]
    result["at_64_clients"] = headline(result)
    result["targets"] = judge(result, args.floor)
    return result


def targets_of(port: int, pid: int, model_id: str, grpc_port: int) -> dict[str, dict]:
    """The service's paths as load targets: PNG and /v2 over HTTP, the same tensors
    over gRPC (its port; the model named in each call)."""
    paths = {"png": "/predict", "v2": f"/v2/models/{model_id}/infer", "grpc": model_id,
             "v2-bytes": f"/v2/models/{model_id}/infer"}  # fmt: skip
    return {
        kind: {"port": grpc_port if kind == "grpc" else port, "pid": pid, "kind": kind,
               "path": paths[kind]}
        for kind in PATHS
    }  # fmt: skip


def images_rows(v2: dict, args: argparse.Namespace) -> list[Row]:
    """/v2 binary with IMAGES_PER_REQUEST images a request, at `clients_for` clients,
    repeated."""
    return [
        Row(lambda n=n: run_load({**v2, "images": n}, args,
                                 concurrency=clients_for(n, args.workers)), args.repeats)
        for n in IMAGES_PER_REQUEST
    ]  # fmt: skip


def clients_for(images: int, workers: int) -> int:
    """Clients for requests of `images` images: as many as keep IMAGES_IN_FLIGHT images
    in flight (the 64 one-image clients' load), and at least two requests a worker, so
    that no worker idles between answering one request and reading the next."""
    return max(math.ceil(IMAGES_IN_FLIGHT / images), 2 * workers)


def closed_loop(target: dict, args: argparse.Namespace, headline_repeats: int) -> list[Row]:
    """The closed loop at every client count of CONCURRENCY; the 64-client row
    `headline_repeats` times, the others once (context)."""
    return [
        Row(lambda c=c: run_load(target, args, concurrency=c),
            headline_repeats if c == HEADLINE_CLIENTS else 1)
        for c in CONCURRENCY
    ]  # fmt: skip


def measure_service(
    model_id: str, path: Path, args: argparse.Namespace, scratch: Path, interleaved
) -> dict:
    """Batching on: the closed loop on both paths, the many-image rows, then the open
    loop at OPEN_LOOP_LOADS of each path's 64-client capacity. Batching off: the closed
    loop once, for context."""
    service: dict = {"closed": {}, "images": [], "open": {}}
    for batching in ("on", "off"):
        grpc_port = free_port()
        server = service_process(
            scratch / f"metrics-{model_id}-{batching}", models_dir=path.parent,
            default_model=model_id, device=args.device, workers=args.workers,
            **{**args.service_settings, "batching": batching == "on", "grpc_port": grpc_port},
        )  # fmt: skip
        with server as (port, process):
            service.setdefault("serving", serving_of(port, model_id))
            inter = interleaved(f"service, batching {batching}")
            targets = targets_of(port, process.pid, model_id, grpc_port)
            repeats = args.repeats if batching == "on" else 1
            rows = [row for t in targets.values() for row in closed_loop(t, args, repeats)]
            many = images_rows(targets["v2"], args) if batching == "on" else []
            measured = inter.run_passes(rows + many)
            for i, kind in enumerate(PATHS):
                n = len(CONCURRENCY)
                service["closed"][f"{kind}, batching {batching}"] = measured[i * n : (i + 1) * n]
            if batching == "on":
                service["images"] = measured[len(PATHS) * len(CONCURRENCY) :]
                service["open"] = open_loop(inter, targets, service["closed"], args)
    return service


def serving_of(port: int, model_id: str) -> dict:
    """What the service computes `model_id` with (its GET /models/{id}): engine,
    precision, instructions, and the ways it declined."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/models/{model_id}", timeout=10) as answer:
        return json.load(answer)["serving"]


def open_loop(inter: Interleaved, targets: dict, closed: dict, args: argparse.Namespace) -> dict:
    """Each path at OPEN_LOOP_LOADS of its capacity (the 64-client row's median req/s),
    both paths in each pass; goodput also as a share of the capacity."""
    rows, kinds = [], []
    for kind, target in targets.items():
        capacity = capacity_of(closed[f"{kind}, batching on"])
        for load in OPEN_LOOP_LOADS:
            rate = max(capacity["rps"], 1.0) * load
            rows.append(Row(
                lambda t=target, r=rate: run_load(t, args, rate=r),
                args.repeats,
                lambda run, lo=load, cap=capacity: {
                    "load": lo, **goodput_of_capacity(run, cap)},
            ))  # fmt: skip
            kinds.append(kind)
    measured = inter.run_passes(rows)
    return {kind: [r for k, r in zip(kinds, measured, strict=True) if k == kind] for kind in PATHS}


def capacity_of(rows: list[dict]) -> dict:
    """A path's capacity: its 64-client row's median answered req/s, and its median share
    of the ceiling next to it (to hold goodput still against the machine's drift)."""
    (row,) = [r for r in rows if r["concurrency"] == HEADLINE_CLIENTS]
    return {"rps": row["rps"], "share_of_ceiling": row["share_of_ceiling"]}


def measure_int8_service(
    model_id: str, path: Path, args: argparse.Namespace, scratch: Path, interleaved
) -> dict:
    """The service on the int8 file, batching on: the 64-client rows of both paths and
    the many-image rows, repeated, against the int8 ceiling next to each run."""
    grpc_port = free_port()
    server = service_process(
        scratch / f"metrics-{model_id}-int8", models_dir=path.parent, default_model=model_id,
        device=args.device, workers=args.workers, **args.service_settings, grpc_port=grpc_port,
    )  # fmt: skip
    with server as (port, process):
        inter = interleaved("service on the int8 file, batching on")
        targets = targets_of(port, process.pid, model_id, grpc_port)
        rows = [
            Row(lambda t=t: run_load(t, args, concurrency=HEADLINE_CLIENTS), args.repeats)
            for t in targets.values()
        ]
        measured = inter.run_passes(rows + images_rows(targets["v2"], args))
    closed = measured[: len(PATHS)]
    return {
        "model_id": model_id,
        "closed": {f"{kind}, batching on": [row] for kind, row in zip(PATHS, closed, strict=True)},
        "images": measured[len(PATHS) :],
    }


def headline(result: dict) -> dict:
    """The 64-client rows, batching on: share of the ceiling next to them (median and
    spread), p99, CPU per request on each side, and the bound that CPU puts on the share."""
    service = result["service"]
    out: dict = {"ceiling_images_per_s": result["ceiling"]["images_per_s"]}
    for kind in PATHS:
        (row,) = [r for r in service["closed"][f"{kind}, batching on"]
                  if r["concurrency"] == HEADLINE_CLIENTS]  # fmt: skip
        out[kind] = {
            "rps": row["rps"],
            "share_of_ceiling": row["share_of_ceiling"],
            "share_spread": row["spread"]["share_of_ceiling"],
            "runs": row["runs"],
            "p99_ms": row["p99_ms"],
            "failed": row["shed"] + row["refused"] + row["errors"],
            "server_cpu_ms": row.get("server_cpu_ms"),
            "client_cpu_ms": row.get("client_cpu_ms"),
            "ceiling_cpu_ms_per_image": row.get("ceiling_cpu_ms_per_image"),
            # Server and generator share the CPUs the ceiling had to itself: the share of
            # the ceiling cannot pass this while each request costs what it cost here.
            "cpu_bound_share": row.get("cpu_bound_share"),
        }
    naive_64 = result["naive"][-1]["rps"]
    out["png"]["over_naive"] = round(out["png"]["rps"] / max(naive_64, 1e-9), 1)
    if result.get("peers"):
        out["peers_rps"] = {name: p["rows"][-1]["rps"] for name, p in result["peers"].items()}
    return out


def judge(result: dict, floor: dict[str, float]) -> list[dict]:
    """Every target's verdict for the model: the 64-client rows (against the lower of the
    ceiling and the serving path's floor), the open loop per path and load, and the
    many-image rows (float, and int8 where measured)."""
    verdicts = []
    for kind in CLOSED_SHARE:
        rows = result["service"]["closed"][f"{kind}, batching on"]
        (i,) = [i for i, r in enumerate(rows) if r["concurrency"] == HEADLINE_CLIENTS]
        rows[i] = bounded(rows[i], floor.get(kind))
        verdicts.append(judge_closed(kind, PATHS[kind], rows[i]))
    for kind, rows in result["service"]["open"].items():
        for row in rows:
            verdicts += judge_open(kind, PATHS[kind], row)
    for row in result["service"]["images"]:
        verdicts.append(judge_images(PATHS["v2"], row))
    if result.get("int8") and result["int8"].get("service"):
        for row in result["int8"]["service"]["images"]:
            verdicts.append(judge_images(f"int8, {PATHS['v2']}", row))
    return verdicts
