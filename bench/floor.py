"""python -m bench floor: server CPU per request, the service against the frameworks' floor.

Three apps that answer a fixed body the size of a one-image /v2 answer (JSON header and
400 bytes of binary FP32 probabilities), each behind the service's own uvicorn setup
(`service.server.server_config`: the same protocol class, header limits, keep-alive,
loop), one worker:
  asgi       a bare ASGI callable: read the body, send the answer
  starlette  one Starlette route doing the same with Request and Response
  fastapi    one FastAPI route, as the service's /v2 infer route reads its request
and a bare `grpc.aio` server (one unary ModelInfer handler answering the same
probabilities as a serialized message, under the service's own gRPC options,
service/rpc/server.py), beside the service itself (`python -m service`, one worker) on
/v2 binary infer, PNG /predict and gRPC ModelInfer with raw contents, and a second one
refusing /v2 requests at a door held closed (bench/door.py; its clients ask again at
once instead of waiting out Retry-After). The services serve
a trivial model by default (bench/modelfiles.py: the contract of every export, inference
in microseconds), so what is measured is the serving path; `--model` names a real one.
Every server runs at once, idle but for the one loaded; the same load generator
(bench/load.py, its own process) loads each in turn, in rounds that rotate the order, so
a machine that slows down or speeds up does so for all of them.
Server CPU per request is the server process's user + system CPU time from /proc over
the load, divided by the responses it gave. Each target's row: the median and min-max
over the rounds, and its median ratio to the bare ASGI app of the same round.
Writes <out>/floor.{json,md}; prints the Markdown.
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.door import closed_settings, held_closed
from bench.machine import describe_machine, machine_line
from bench.modelfiles import TRIVIAL, model_files
from bench.procfs import cpu_seconds
from bench.results import write
from bench.servers import HOST, free_port, listeners, server_process, service_process
from service.config import Settings

APPS = ("asgi", "starlette", "fastapi")
CONTENT_TYPE = b"application/octet-stream"
HEADER_LENGTH = b"inference-header-content-length"


def answer() -> tuple[bytes, bytes]:
    """The body of a one-image /v2 answer with binary probabilities, and the length of
    its JSON part (the header the protocol sends beside it)."""
    head = json.dumps(
        {"model_name": "cifar100-5735844", "model_version": "0123456789ab",
         "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 100],
                      "parameters": {"binary_data_size": 400}}]},
        separators=(",", ":"),
    ).encode()  # fmt: skip
    return head + bytes(400), str(len(head)).encode()


# --- the floor apps (factories: uvicorn builds them in the server process) ---------------


def asgi_app():
    body, head = answer()
    headers = [(b"content-type", CONTENT_TYPE), (b"content-length", str(len(body)).encode()),
               (HEADER_LENGTH, head)]  # fmt: skip
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    done = {"type": "http.response.body", "body": body}

    async def app(scope, receive, send):
        if scope["type"] != "http":  # lifespan: nothing to start
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send(start)
        await send(done)

    return app


def starlette_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    body, head = answer()

    async def infer(request: Request) -> Response:
        await request.body()
        return Response(body, media_type=CONTENT_TYPE.decode(),
                        headers={HEADER_LENGTH.decode(): head.decode()})  # fmt: skip

    async def ready(request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    return Starlette(routes=[Route("/v2/models/{model_name}/infer", infer, methods=["POST"]),
                             Route("/health/ready", ready)])  # fmt: skip


def fastapi_app():
    from fastapi import FastAPI, Request, Response

    body, head = answer()
    app = FastAPI()

    @app.post("/v2/models/{model_name}/infer")
    async def infer(request: Request) -> Response:
        await request.body()
        return Response(body, media_type=CONTENT_TYPE.decode(),
                        headers={HEADER_LENGTH.decode(): head.decode()})  # fmt: skip

    @app.get("/health/ready")
    async def ready() -> dict:
        return {}

    return app


async def grpc_floor(settings: Settings) -> None:
    """A bare grpc.aio server: one unary ModelInfer handler, bytes in, a fixed serialized
    answer out (no deserializing, no metadata read), under the service's gRPC options."""
    import grpc

    from service.rpc import inference_pb2 as pb
    from service.rpc.server import options

    reply = pb.ModelInferResponse(model_name="cifar100-5735844", model_version="0123456789ab")
    reply.outputs.add(name="probabilities", datatype="FP32", shape=[1, 100])
    reply.raw_output_contents.append(bytes(400))
    answer = reply.SerializeToString()

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)},
    )
    channel_options, calls = options(settings)
    server = grpc.aio.server(options=channel_options, maximum_concurrent_rpcs=calls)
    server.add_generic_rpc_handlers([handler])
    server.add_insecure_port(f"{HOST}:{settings.grpc_port}")
    await server.start()
    await server.wait_for_termination()


def serve_floor(kind: str, port: int) -> None:
    """`python -m bench.floor KIND PORT`: a floor app behind the service's uvicorn setup,
    or (grpc) the bare gRPC server on the event loop the service runs on."""
    import uvicorn

    from service.server import server_config

    settings = Settings(host=HOST, port=port, workers=1, log_level="WARNING", grpc_port=0)
    config = server_config(settings, f"bench.floor:{kind}_app")
    if kind == "grpc":
        grpc_settings = Settings(host=HOST, workers=1, grpc_port=port)
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(grpc_floor(grpc_settings))
    else:
        uvicorn.Server(config).run()


@contextlib.contextmanager
def grpc_floor_process(port: int):
    """The bare gRPC floor in its own process, once it listens."""
    command = [sys.executable, "-m", "bench.floor", "grpc", str(port)]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # as server_process: importing bench takes a while
        while not listeners(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gRPC floor did not start")
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- the mode ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This mode's options, beside the one-model options (--models-dir, --model, --out,
    --seconds: per load)."""
    parser.set_defaults(seconds=4.0, model=TRIVIAL)
    parser.add_argument("--rounds", type=int, default=5, help="loads per target, rotated")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--only", nargs="+", help="targets to measure (default: all)")
    parser.add_argument(
        "--compare",
        type=Path,
        help="a folder holding another version's `service` package (`git archive REV "
        "service | tar -x -C DIR`): its /v2, /predict and refusals measured in the same "
        "rounds",
    )


def main(args: argparse.Namespace) -> int:
    settings = Settings(workers=1)
    results: dict = {
        "machine": describe_machine(settings), "model": args.model,
        "concurrency": args.concurrency, "seconds": args.seconds, "rounds": args.rounds,
        "compared": str(args.compare or ""), "targets": {},
    }  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="bench-floor-") as scratch,
        contextlib.ExitStack() as up,
    ):
        path, weights = model_files(args.models_dir, Path(scratch), [args.model])[args.model]
        results["weights"] = weights
        targets = {}  # name -> (port, pid, load arguments)
        infer = ["--kind", "v2", "--path", f"/v2/models/{args.model}/infer"]
        for kind in APPS:
            port = free_port()
            command = [sys.executable, "-m", "bench.floor", kind, str(port)]
            process = up.enter_context(server_process(command, {}, port))
            targets[f"{kind} floor"] = (port, process.pid, infer)
        port = free_port()
        process = up.enter_context(grpc_floor_process(port))
        grpc_infer = ["--kind", "grpc", "--path", args.model]
        targets["grpc floor"] = (port, process.pid, grpc_infer)
        grpc_port = free_port()
        port, process = up.enter_context(service_process(
            models_dir=path.parent, default_model=args.model, workers=1,
            grpc_port=grpc_port))  # fmt: skip
        targets["service /v2 binary"] = (port, process.pid, infer)
        targets["service /predict PNG"] = (port, process.pid, ["--kind", "png"])
        targets["service gRPC raw"] = (grpc_port, process.pid, grpc_infer)
        # The cost of a refusal: a second service whose door is held closed (bench/door.py).
        port, process = up.enter_context(service_process(
            models_dir=path.parent, workers=1, **closed_settings(args.model)))  # fmt: skip
        up.enter_context(held_closed(port, args.model))
        targets["service /v2 refused at the door"] = (
            port, process.pid, [*infer, "--no-wait"])  # fmt: skip
        if args.compare:
            grpc_port = free_port()
            port, process = up.enter_context(service_process(
                models_dir=path.parent, default_model=args.model, workers=1,
                source=args.compare.resolve(), grpc_port=grpc_port))  # fmt: skip
            targets["compared /v2 binary"] = (port, process.pid, infer)
            targets["compared /predict PNG"] = (port, process.pid, ["--kind", "png"])
            targets["compared gRPC raw"] = (grpc_port, process.pid, grpc_infer)
            port, process = up.enter_context(service_process(
                models_dir=path.parent, workers=1, source=args.compare.resolve(),
                **closed_settings(args.model)))  # fmt: skip
            up.enter_context(held_closed(port, args.model))
            targets["compared /v2 refused at the door"] = (port, process.pid, [*infer, "--no-wait"])
        names = [n for n in targets if not args.only or any(o in n for o in args.only)]
        for name in names:  # warm each (the service's first batches, imports)
            load(targets[name], 1.0, args.concurrency)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                runs[name].append(load(targets[name], args.seconds, args.concurrency))
    results["machine"]["load_average_end"] = list(os.getloadavg())
    floor = runs.get("asgi floor")
    for name, measured in runs.items():
        per_request = [r["server_cpu_ms_per_request"] for r in measured]
        row = {
            "server_cpu_ms_per_request": round(statistics.median(per_request), 4),
            "min": round(min(per_request), 4),
            "max": round(max(per_request), 4),
            "rps": statistics.median(r["rps"] for r in measured),
            "shed": sum(r["shed"] for r in measured),
            "errors": sum(r["errors"] + r["refused"] for r in measured),
            "runs": measured,
        }
        if floor:
            row["x_asgi_floor"] = ratio(measured, floor)
        if name.startswith("compared ") and (ours := runs.get(name.replace("compared", "service"))):
            # Below 1: the service is cheaper than the compared version; its spread too.
            row["service_x_compared"] = ratio(ours, measured)
            each = [o["server_cpu_ms_per_request"] / m["server_cpu_ms_per_request"]
                    for o, m in zip(ours, measured, strict=True)]  # fmt: skip
            row["service_x_compared_range"] = [round(min(each), 3), round(max(each), 3)]
        results["targets"][name] = row
    write(results, args.out, "floor", to_markdown)
    return 0


def ratio(runs: list[dict], to: list[dict]) -> float:
    """The median over the rounds of one target's CPU per request over another's."""
    return round(statistics.median(
        r["server_cpu_ms_per_request"] / t["server_cpu_ms_per_request"]
        for r, t in zip(runs, to, strict=True)), 3)  # fmt: skip


def load(target: tuple[int, int, list[str]], seconds: float, concurrency: int) -> dict:
    """One closed-loop load on the target: the load generator's summary, with the server's
    CPU per response over it."""
    port, pid, kind = target
    generator = "bench.grpc_load" if "grpc" in kind else "bench.load"
    command = [sys.executable, "-m", generator, "--port", str(port), *kind,
               "--concurrency", str(concurrency), "--duration", str(seconds)]  # fmt: skip
    before = cpu_seconds(pid)
    finished = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    used = cpu_seconds(pid) - before
    stats = json.loads(finished.stdout)
    responses = stats["requests"] + stats["shed"] + stats["refused"]
    stats["server_cpu_s"] = round(used, 3)
    stats["server_cpu_ms_per_request"] = round(1000 * used / max(responses, 1), 4)
    return stats


def to_markdown(results: dict) -> str:
    lines = [
        machine_line(results["machine"]),
        "",
        f"Closed loop, {results['concurrency']} keep-alive clients, {results['seconds']:g} s "
        f"per load, {results['rounds']} rounds in rotated order; one worker each; "
        f"{results['model']} ({results['weights']}).",
        "",
        "| target | server CPU ms per request (median) | min-max | x bare ASGI | req/s | "
        "503 | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    compared = [
        f"{name.removeprefix('compared ')} {row['service_x_compared']:.2f}x "
        f"({row['service_x_compared_range'][0]:.2f}-{row['service_x_compared_range'][1]:.2f})"
        for name, row in results["targets"].items()
        if "service_x_compared" in row
    ]
    for name, row in results["targets"].items():
        lines.append(
            f"| {name} | {row['server_cpu_ms_per_request']:.3f} | {row['min']:.3f}-"
            f"{row['max']:.3f} | {row.get('x_asgi_floor', '-')} | {row['rps']:.0f} | "
            f"{row['shed']} | {row['errors']} |"
        )
    if compared:
        lines += ["", f"The service over the compared version ({results['compared']}), "
                  f"median of the rounds' ratios: {', '.join(compared)}."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    serve_floor(sys.argv[1], int(sys.argv[2]))
