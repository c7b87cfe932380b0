"""One table row = one `python -m bench.load` run against a server, with the server's CPU.

The generator runs in its own process (it must not share the server's interpreter or
the harness's); the server's CPU-seconds over the run come from /proc (its whole
process tree)."""

import argparse
import json
import subprocess
import sys

from bench.procfs import cpu_seconds

CONCURRENCY = (1, 8, 32, 64)


def run_load(target: dict, args: argparse.Namespace, **mode: float) -> dict:
    """One load run against `target` (port, kind, path[, field][, images: per v2
    request][, pid: the server's, for its CPU]) for `args.seconds`: `concurrency=N`
    (closed loop) or `rate=R` (open loop). gRPC: port is GRPC_PORT, path the model."""
    generator = "bench.grpc_load" if target["kind"].startswith("grpc") else "bench.load"
    command = [
        sys.executable, "-m", generator, "--port", str(target["port"]),
        "--kind", target["kind"], "--path", target["path"],
        "--field", target.get("field", "files"), "--duration", str(args.seconds),
        "--images", str(target.get("images", 1)),
    ]  # fmt: skip
    if "rate" in mode:
        command += ["--rate", str(mode["rate"]), "--requests", str(args.requests)]
    else:
        concurrency = int(mode["concurrency"])
        command += ["--concurrency", str(concurrency)]
        command += ["--requests", str(max(args.requests, concurrency))]
    server = target.get("pid")
    server_cpu = cpu_seconds(server) if server else None
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    row = {"images_per_request": target.get("images", 1), **json.loads(out)}
    if server_cpu is not None:
        row["server_cpu_s"] = round(cpu_seconds(server) - server_cpu, 3)
    print(f"  {target['kind']} {target['path']} {mode}: {row}", flush=True)
    return row
