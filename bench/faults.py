"""python -m bench faults: the service under faults and overload, and what hostile requests cost.

Loopback only; every load is bounded in time and count and stops by itself. The server
is `python -m service` (with its protocol limits), WORKERS processes, with
HEADER_TIMEOUT_SECONDS and BODY_TIMEOUT_SECONDS lowered (2 s by default) so slow
clients are cut within the run. Rows:
  overload      open loop at 10x the closed-loop capacity (binary tensors through /v2,
                32 images a request, so the generator can offer 10x; the capacity from
                2 clients per worker, which it serves without shedding): answered, shed,
                p99 of the answered
  slow clients  200 connections dribbling their headers (100) or stalling mid-body (100),
                reconnecting when cut, beside one normal client: its p99, connections
                closed by the server
  soak          64 clients on /predict for --soak-seconds: RSS of the server's processes
                at the start and the end
  SIGTERM       under 64 clients: requests lost on connections the server had accepted
                (must be 0); resets of new connections (possibly never accepted: the
                kernel's backlog) and refused connects counted apart; shutdown time
  slow upload   an upload still arriving when SIGTERM comes: its answer, shutdown time
  amplification 64 solid-colour 4096x4096 PNGs with resize=true (refused from the
                headers) and the largest request accepted (4 x 2048x2048): server
                CPU-seconds per request, from /proc
Then a second table: every case of the hostile corpus (bench/hostile.py) sent once, with
bytes sent and answered, status (and whether it is one documented for the case), server
CPU-seconds and peak RSS growth, and the worst ratios to the bytes sent.
The SIGTERM rows are bench/shutdown.py's; a request's cost is measured by
bench/amplification.py. Writes <out>/faults.json and faults.md; prints the Markdown.
"""

import argparse
import asyncio
import io
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.amplification import hostile_markdown, hostile_rows, measure, warm_up
from bench.hostile import cases
from bench.load import (
    build_requests,
    closed_loop,
    http_request,
    multipart_body,
    multipart_form,
    open_loop,
    png_images,
)
from bench.modelfiles import model_files
from bench.procfs import rss_mib
from bench.results import write
from bench.servers import HOST, service_process
from bench.shutdown import sigterm_under_load, slow_upload_sigterm
from service.config import available_cpus

OVERLOAD_IMAGES = 32  # per /v2 request in the overload row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This mode's options, beside the one-model options every mode on one model shares
    (--models-dir, --model, --out, --seconds)."""
    parser.set_defaults(seconds=8.0)
    parser.add_argument("--workers", type=int, default=available_cpus())
    parser.add_argument("--soak-seconds", type=float, default=150.0)
    parser.add_argument("--repeats", type=int, default=5, help="amplification requests")
    parser.add_argument(
        "--client-timeout", type=float, default=2.0, help="HEADER_ and BODY_TIMEOUT_SECONDS"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny durations, every row")


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        args.seconds, args.soak_seconds, args.repeats, args.client_timeout = 1.0, 1.0, 1, 0.5
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as scratch:
        path, _ = model_files(args.models_dir, Path(scratch), [args.model])[args.model]
        settings = {
            "models_dir": path.parent, "default_model": args.model, "device": "cpu",
            "workers": args.workers, "header_timeout_seconds": args.client_timeout,
            "body_timeout_seconds": args.client_timeout,
        }  # fmt: skip
        rows = run_all(Path(scratch) / "metrics", settings, args)
        with service_process(Path(scratch) / "metrics", **settings) as (port, process):
            warm_up(port, args.model)
            hostile = hostile_rows(port, process.pid, cases(args.model))
    results = {
        "model": args.model,
        "workers": args.workers,
        "cpus_available": available_cpus(),
        "client_timeout_seconds": args.client_timeout,
        "load_average": list(os.getloadavg()),
        "rows": rows,
        "hostile": hostile,
    }
    write(results, args.out, "faults", to_markdown)
    return 0


def run_all(metrics: Path, settings: dict, args: argparse.Namespace) -> list[dict]:
    """Every row, each SIGTERM row on a server of its own."""
    rows = []
    with service_process(metrics, **settings) as (port, process):
        rows.append(asyncio.run(overload(port, args)))
        rows.append(asyncio.run(slow_clients(port, args)))
        rows.append(asyncio.run(soak(port, process.pid, args)))
        rows.extend(amplification(port, process.pid, args))
    with service_process(metrics, **settings) as (port, process):
        rows.append(asyncio.run(sigterm_under_load(port, process, args)))
    with service_process(metrics, **settings) as (port, process):
        rows.append(asyncio.run(slow_upload_sigterm(port, process, args)))
    return rows


# --- the rows -----------------------------------------------------------------------------


def _v2_path(args: argparse.Namespace) -> str:
    return f"/v2/models/{args.model}/infer"


async def overload(port: int, args: argparse.Namespace) -> dict:
    requests = build_requests("v2", HOST, _v2_path(args), images_per_request=OVERLOAD_IMAGES)
    # Two requests per worker: a full batch each, and well under the queue's bound, so the
    # capacity is measured without shedding (more clients would count their 503s out).
    clients = 2 * args.workers
    capacity = await closed_loop(HOST, port, requests, clients, args.seconds, 1_000_000)
    rate = max(capacity["rps"], 1.0) * 10
    result = await open_loop(HOST, port, requests, rate, args.seconds, 1_000_000)
    return {
        "fault": "overload",
        "load": f"open loop at 10x capacity: {rate:.0f} req/s of {OVERLOAD_IMAGES} images "
        f"(/v2 binary) for {args.seconds:g} s; capacity {capacity['rps']} req/s at "
        f"{clients} clients",
        "capacity_rps": capacity["rps"],
        **{k: result[k] for k in ("rate", "sent", "unsent", "requests", "rps", "shed")},
        **{k: result[k] for k in ("refused", "errors", "p50_ms", "p99_ms")},
    }


async def slow_clients(port: int, args: argparse.Namespace) -> dict:
    """100 header dribblers and 100 mid-body stallers, reconnecting when cut, beside one
    normal client posting PNGs."""
    duration = max(args.seconds, 3 * args.client_timeout)
    deadline = time.perf_counter() + duration
    outcome = {"opened": 0, "answered_408": 0, "shed_503": 0, "closed_other": 0, "open_at_end": 0}
    cut = {"headers": 0, "body": 0}  # 408s by the kind of slowness
    body, content_type = multipart_body(png_images(1)[0], "slow.png")
    body_head = http_request("/predict", HOST, body, {"Content-Type": content_type})
    body_head = body_head[: len(body_head) - len(body) + 100]  # headers, then 100 bytes

    async def slow(kind: str) -> None:
        while time.perf_counter() < deadline:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            outcome["opened"] += 1
            if kind == "headers":
                writer.write(f"POST /predict HTTP/1.1\r\nHost: {HOST}\r\n".encode())
            else:
                writer.write(body_head)
            answer = asyncio.ensure_future(reader.read(65536))
            try:
                while not answer.done() and time.perf_counter() < deadline:
                    if kind == "headers":  # one byte of a never-ending header, 4 a second
                        writer.write(b"x")
                    await asyncio.wait([answer], timeout=0.25)
                if answer.done():
                    data = answer.result() if not answer.exception() else b""
                    # A staller's headers are complete: the door may shed it (503) while the
                    # normal client's requests queue, before its body is waited for.
                    key = {b"408": "answered_408", b"503": "shed_503"}.get(
                        data[9:12], "closed_other"
                    )
                    outcome[key] += 1
                    cut[kind] += key == "answered_408"
                else:
                    outcome["open_at_end"] += 1
                    answer.cancel()
            except OSError:
                outcome["closed_other"] += 1
            finally:
                writer.close()

    normal = build_requests("png", HOST, "/predict")
    tasks = [asyncio.ensure_future(slow("headers" if i % 2 else "body")) for i in range(200)]
    await asyncio.sleep(0.5)  # let them connect first
    result = await closed_loop(HOST, port, normal, 1, deadline - time.perf_counter(), 1_000_000)
    await asyncio.gather(*tasks)
    return {
        "fault": "slow clients",
        "load": f"200 slow connections (100 dribbling headers, 100 stalled mid-body; "
        f"timeouts {args.client_timeout:g} s) beside 1 normal client, {duration:g} s",
        **outcome,
        "answered_408_by_kind": cut,
        "normal_requests": result["requests"],
        "normal_p50_ms": result["p50_ms"],
        "normal_p99_ms": result["p99_ms"],
        "normal_failed": result["shed"] + result["refused"] + result["errors"],
    }


async def soak(port: int, pid: int, args: argparse.Namespace) -> dict:
    requests = build_requests("png", HOST, "/predict")
    await closed_loop(HOST, port, requests, 64, min(2.0, args.soak_seconds), 1_000_000)
    start = rss_mib(pid)
    result = await closed_loop(HOST, port, requests, 64, args.soak_seconds, 100_000_000)
    end = rss_mib(pid)
    return {
        "fault": "soak",
        "load": f"64 clients, PNG /predict, {args.soak_seconds:g} s",
        "rss_start_mib": start,
        "rss_end_mib": end,
        "requests": result["requests"],
        "rps": result["rps"],
        "p99_ms": result["p99_ms"],
        # 64 clients ask more than 2 CPUs answer within MAX_QUEUE_DELAY_MS: shedding some
        # is the door working (the clients wait as Retry-After says), not a failure.
        "shed": result["shed"],
        "failed": result["refused"] + result["errors"],
    }


def solid_png(size: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "PNG")
    return buffer.getvalue()


def amplification(port: int, pid: int, args: argparse.Namespace) -> list[dict]:
    """Server CPU-seconds per request: the amplification request (refused), the largest
    accepted one, and an ordinary 32x32 request for scale."""
    big, large = solid_png(4096, (200, 30, 30)), solid_png(2048, (30, 200, 30))
    cases = [
        ("amplification", "64 solid 4096x4096 PNGs, resize=true", [big] * 64),
        ("largest accepted", "4 solid 2048x2048 PNGs, resize=true", [large] * 4),
        ("ordinary", "1 32x32 PNG", png_images(1)),
    ]
    rows = []
    for name, load, images in cases:
        body, content_type = multipart_form([(f"big{i}.png", im) for i, im in enumerate(images)])
        headers = {"Content-Type": content_type, "Connection": "close"}
        request = http_request("/predict?resize=true", HOST, body, headers)
        repeats = args.repeats * (20 if name == "ordinary" else 1)
        cost = measure(port, pid, request, repeats)
        rows.append({
            "fault": name,
            "load": f"{load}, {len(body) / 1e6:.2f} MB body, {repeats} sequential requests",
            **cost,
        })  # fmt: skip
    return rows


# --- the table ----------------------------------------------------------------------------


def describe(row: dict) -> str:
    r = row
    if r["fault"] == "overload":
        return (
            f"offered {r['rate']} req/s, sent {r['sent']} ({r['unsent']} over the client's "
            f"connection cap); answered {r['requests']} ({r['rps']} req/s), shed (503) "
            f"{r['shed']}, other 4xx {r['refused']}, errors {r['errors']}; p99 of the "
            f"answered {r['p99_ms']} ms"
        )
    if r["fault"] == "slow clients":
        return (
            f"normal client: {r['normal_requests']} answered, p50 {r['normal_p50_ms']} ms, "
            f"p99 {r['normal_p99_ms']} ms, {r['normal_failed']} failed; slow connections: "
            f"{r['opened']} opened, {r['answered_408']} closed with 408 ("
            f"{r['answered_408_by_kind']['headers']} dribbling headers, "
            f"{r['answered_408_by_kind']['body']} stalled mid-body), "
            f"{r['shed_503']} shed at the door (503), {r['closed_other']} closed otherwise, "
            f"{r['open_at_end']} open at the end"
        )
    if r["fault"] == "soak":
        return (
            f"RSS {r['rss_start_mib']} MiB at the start, {r['rss_end_mib']} MiB at the end; "
            f"{r['requests']} answered ({r['rps']} req/s), p99 {r['p99_ms']} ms, "
            f"{r['shed']} shed (503 + Retry-After), {r['failed']} failed"
        )
    if r["fault"] == "SIGTERM under load":
        return (
            f"accepted requests lost: **{r['lost']}**; answered {r['answered_before']} "
            f"before and {r['answered_after']} after SIGTERM ({r['shed_after']} shed with "
            f"Retry-After, {r['failed_after']} other non-200 after); resets of new "
            f"connections (kernel backlog) {r['reset_new_connection']}"
            f"; refused connects {r['refused_connect']}; exited after {r['shutdown_seconds']} s"
        )
    if r["fault"] == "slow upload during SIGTERM":
        return (
            f"upload answered {r['upload_status']} after {r['upload_answered_after_s']} s; "
            f"server exited {r['shutdown_seconds']} s after SIGTERM"
        )
    return (
        f"status {', '.join(map(str, r['statuses']))}; {r['cpu_seconds_per_request']} "
        f"server CPU-seconds per request; {r['wall_ms_per_request']} ms each"
    )


def to_markdown(results: dict) -> str:
    lines = [
        f"`python -m bench faults`: {results['model']}, {results['workers']} worker(s) on "
        f"{results['cpus_available']} CPUs, HEADER_TIMEOUT_SECONDS = BODY_TIMEOUT_SECONDS = "
        f"{results['client_timeout_seconds']:g} s; 1-minute load average at the end "
        f"{results['load_average'][0]:.2f}.",
        "",
        "| fault | load | result |",
        "|---|---|---|",
    ]
    lines += [f"| {r['fault']} | {r['load']} | {describe(r)} |" for r in results["rows"]]
    lines += [
        "",
        "Amplification, by hostile case (bench/hostile.py): each sent once, on a server of "
        "its own warmed up by the largest legitimate requests; CPU and peak RSS growth of "
        "the server's process tree from /proc.",
        "",
        hostile_markdown(results["hostile"]),
    ]
    return "\n".join(lines)
