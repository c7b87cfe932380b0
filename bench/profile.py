"""python -m bench profile: where each request's microseconds go, from py-spy.

One worker (`python -m service`, WEB_CONCURRENCY=1, every CPU for its onnxruntime session) is
loaded by 64 closed-loop clients on each path (PNG through /predict, binary tensors
through /v2, raw tensors over gRPC) while py-spy samples it. Server CPU-seconds per
answered request come from /proc. py-spy samples the thread holding the GIL (`--gil`),
200 times a second; each sample (5 ms of Python work) is charged to the innermost frame
that belongs to a known part (the table's rows). The rest of the CPU time is work done
without the GIL: onnxruntime's inference, on its own threads.
Needs py-spy (`--py-spy PATH`; e.g. `pip install py-spy` into any environment) and
permission to ptrace the server. Writes <out>/profile.{json,md}; prints the Markdown.
"""

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.modelfiles import model_files
from bench.procfs import cpu_seconds
from bench.results import write
from bench.servers import free_port, service_process
from service.config import available_cpus

RATE = 200  # samples per second
UNSEEN = "without the GIL: onnxruntime's inference (the rest of /proc's CPU time)"
FRAME = re.compile(r"\((?P<file>[^()]*?)(?::\d+)?\)$")
# (part, patterns in the frame's file path), innermost match wins; first listed wins ties.
PARTS = (
    ("onnxruntime calls, with the GIL (inputs, outputs)", ("onnxruntime/",)),
    ("image decoding (Pillow)", ("PIL/",)),
    ("multipart parsing", ("multipart/", "python_multipart/", "starlette/formparsers")),
    ("JSON", ("json/",)),
    ("pydantic (validation, serialisation)", ("pydantic/", "pydantic_core/")),
    ("FastAPI (routing, dependencies, encoding)", ("fastapi/",)),
    ("Starlette (requests, responses, middleware)", ("starlette/",)),
    ("HTTP parsing and transport (uvicorn, httptools)", ("uvicorn/", "httptools/")),
    ("gRPC (grpcio, protobuf)", ("grpc/", "grpc_", "google/protobuf/")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("logging", ("logging/",)),
    ("numpy", ("numpy/",)),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop/", "concurrent/", "threading.py")),
    ("service code", ("service/",)),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This mode's options, beside the one-model options every mode on one model shares
    (--models-dir, --model, --out, --seconds)."""
    parser.set_defaults(seconds=15.0)
    parser.add_argument("--py-spy", help="the py-spy executable")


def main(args: argparse.Namespace) -> int:
    spy = args.py_spy or shutil.which("py-spy")
    if not spy:
        raise SystemExit("py-spy not found: install it (pip install py-spy) or pass --py-spy")
    results: dict = {"model": args.model, "cpus_available": available_cpus(), "paths": {}}
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as scratch:
        path, _ = model_files(args.models_dir, Path(scratch), [args.model])[args.model]
        grpc_port = free_port()
        server = service_process(models_dir=path.parent, default_model=args.model, workers=1,
                                 grpc_port=grpc_port)  # fmt: skip
        with server as (port, process):
            for kind, url, to in (("png", "/predict", port),
                                  ("v2", f"/v2/models/{args.model}/infer", port),
                                  ("grpc", args.model, grpc_port)):  # fmt: skip
                raw = Path(scratch) / f"{kind}.txt"
                results["paths"][kind] = profile_path(spy, to, process.pid, kind, url, raw, args)
    write(results, args.out, "profile", to_markdown)
    return 0


def profile_path(
    spy: str, port: int, pid: int, kind: str, url: str, raw: Path, args: argparse.Namespace
) -> dict:
    """py-spy on server `pid` while 64 clients load `url`: server µs per request, by part."""
    generator = "bench.grpc_load" if kind == "grpc" else "bench.load"
    load = subprocess.Popen(
        [sys.executable, "-m", generator, "--port", str(port), "--kind", kind, "--path", url,
         "--concurrency", "64", "--duration", str(args.seconds + 2)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    before = cpu_seconds(pid)
    subprocess.run(
        [spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
         "--rate", str(RATE), "--format", "raw", "--output", str(raw), "--nonblocking", "--gil"],
        check=True, capture_output=True,
    )  # fmt: skip
    used = cpu_seconds(pid) - before
    stats = json.loads(load.communicate(timeout=120)[0])
    requests = max(stats["rps"] * args.seconds, 1)  # answered while sampled (steady state)
    per_request_us = 1e6 * used / requests
    # A sample is 1/RATE s of the thread holding the GIL (Python's own work); the rest of
    # the CPU time measured from /proc is work without the GIL: onnxruntime's inference.
    parts = {p: 1e6 * n / RATE / requests for p, n in charge(raw.read_text()).most_common()}
    parts[UNSEEN] = per_request_us - sum(parts.values())
    return {
        "rps": stats["rps"],
        "p99_ms": stats["p99_ms"],
        "server_cpu_us_per_request": round(per_request_us, 1),
        "parts_us": {part: round(us, 1) for part, us in parts.items()},
    }


def charge(raw: str) -> collections.Counter:
    """Samples per part, from py-spy's raw (collapsed) output."""
    counts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        counts[part_of(stack.split(";"))] += int(number)
    return counts


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        match = FRAME.search(frame)
        file = match["file"] if match else frame
        for part, patterns in PARTS:
            if any(pattern in file for pattern in patterns):
                return part
    return "other (interpreter, other libraries)"


def to_markdown(results: dict) -> str:
    """One table: each part's server µs per request, and its share, on each path."""
    paths = results["paths"]
    names = {"png": "PNG, /predict", "v2": "tensor, /v2 binary", "grpc": "tensor, gRPC raw"}
    parts = sorted(
        {p for r in paths.values() for p in r["parts_us"]},
        key=lambda p: -max(r["parts_us"].get(p, 0) for r in paths.values()),
    )
    lines = [
        f"py-spy, one worker ({results['cpus_available']} onnxruntime threads), 64 clients, "
        f"{results['model']}: "
        + "; ".join(
            f"{names[k]} {r['rps']} req/s, {r['server_cpu_us_per_request']} µs of server CPU "
            "per request"
            for k, r in paths.items()
        ),
        "",
        "| part | " + " | ".join(f"{names[k]}: µs per request" for k in paths) + " |",
        "|---|" + "---|" * len(paths),
    ]
    for part in parts:
        cells = []
        for r in paths.values():
            us = r["parts_us"].get(part, 0)
            cells.append(f"{us:.0f} ({us / r['server_cpu_us_per_request']:.0%})")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
