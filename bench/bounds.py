"""What bounds a one-image row: the machine's ceiling, or the serving path's own floor.

With a fast engine (OpenVINO in bfloat16, or a GPU) the model costs less than the Python
around each request, and no server can answer one image a request faster than its own
path does with a model that costs nothing. So the single-image rows are judged against
the lower of two numbers measured in the same run: the ceiling windows next to the row
(bench/ceiling.py, images/s) and the floor, the service serving the trivial model
(bench/modelfiles.py: inference in microseconds) to the same number of clients on the
same path (requests/s). Both are printed beside the row.
"""

import argparse
from pathlib import Path

from bench.driver import run_load
from bench.modelfiles import TRIVIAL, model_files
from bench.servers import free_port, service_process
from bench.steady import combine


def measure_floor(args: argparse.Namespace, scratch: Path, clients: int, targets_of) -> dict:
    """Each path's requests/s on the trivial model at `clients` clients, median of
    `args.repeats` runs: {kind: row}. `targets_of(port, pid, model_id, grpc_port)`: the
    service's paths as load targets (bench/run.py)."""
    path, _ = model_files(args.models_dir, scratch / "floor", [TRIVIAL])[TRIVIAL]
    grpc_port = free_port()
    server = service_process(
        scratch / "metrics-floor", models_dir=path.parent, default_model=TRIVIAL,
        device=args.device, workers=args.workers, **args.service_settings, grpc_port=grpc_port,
    )  # fmt: skip
    with server as (port, process):
        targets = targets_of(port, process.pid, TRIVIAL, grpc_port)
        return {
            kind: combine([run_load(target, args, concurrency=clients)
                           for _ in range(args.repeats)])
            for kind, target in targets.items()
        }  # fmt: skip


def bounded(row: dict, floor_rps: float | None) -> dict:
    """`row` (a one-image row, its ceiling next to it) with `floor_rps`, `bound` (the
    lower of the ceiling and the floor) and `share_of_bound`."""
    ceiling = row.get("ceiling")
    candidates = [value for value in (ceiling, floor_rps) if value]
    bound = min(candidates) if candidates else None
    share = round(row["images_per_s"] / bound, 4) if bound else None
    return {**row, "floor_rps": floor_rps, "bound": bound, "share_of_bound": share}
