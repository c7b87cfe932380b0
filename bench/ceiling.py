"""What the machine does: each engine alone, no server, in the harness's own process.

Two measures. The table: every way this machine offers the file (contract/engines.py:
onnxruntime float32, OpenVINO float32 and bfloat16 where the CPU has it, and on an int8
twin onnxruntime's and OpenVINO's int8), each on every CPU available at batch 1, 8, 32
and 128, each with its promise held or not (the file's self-check, through that engine,
here) and what that check cost; the fastest way whose promise holds is the ceiling, and
the service's own session options (one worker's threads) on that way are beside it for
context. And windows: short
runs of the ceiling's session at its best batch size, taken between the service's rows
while the server idles, so each row is compared with the ceiling of the minutes it ran in
(bench/steady.py) rather than with one taken before a drift.
"""

import time
from pathlib import Path

import numpy as np

from contract.classifier import Classifier
from contract.engines import Engine, Way, open_engine, ways
from contract.errors import InvalidModel
from service.config import Settings, available_cpus

BATCH_SIZES = (1, 8, 32, 128)


def session(path: Path, device: str, way: Way, threads: int | None = None) -> Classifier:
    """The file on exactly `way`, on `threads` engine threads (every CPU available by
    default): the ceiling's session."""
    precision = way.precision if way.precision in ("float32", "bfloat16") else "auto"
    return Classifier(path, device, threads or available_cpus(), 1, engine=way.engine,
                      precision=precision)  # fmt: skip


def measure_table(path: Path, settings: Settings, seconds: float) -> dict:
    """Every way of the file (`ways` with ENGINE and PRECISION left to auto), on all CPUs,
    at each of BATCH_SIZES for `seconds` each, with its promise: "held", or why not. The
    fastest way that holds its promise is the ceiling (`way`, `images_per_s`,
    `best_batch`, `all_cpus`); `per_worker` is that way with one worker's threads."""
    probe = Classifier(path, settings.device, 1, 1, engine="onnxruntime")
    offered, skipped = ways(probe.file_precision, device=settings.device)
    measured = []
    for way in offered:
        self_check = None
        try:
            model = session(path, settings.device, way)
            try:
                model.warm_up()
                promise, self_check = "held", model.self_check_seconds
            except InvalidModel as err:  # timed all the same: what the promise would cost
                promise = err.message.removeprefix(f"{path.name}: ")
            timed, instructions = model, model.serving.get("instructions")
        except InvalidModel as err:  # no promise in that precision: the engine alone
            promise = err.message.removeprefix(f"{path.name}: ")
            engine = open_engine(path.read_bytes(), way, name=path.name, threads=available_cpus())
            timed, instructions = Bare(engine), engine.describe().get("instructions")
        rows = time_table(timed, seconds)
        best = max(BATCH_SIZES, key=lambda b: rows[b]["images_per_s"])
        measured.append({
            "way": str(way), "engine": way.engine, "precision": way.precision,
            "device": way.device, "instructions": instructions, "promise": promise,
            "self_check_seconds": self_check, "threads": available_cpus(), "batches": rows,
            "best_batch": best, "images_per_s": rows[best]["images_per_s"],
        })  # fmt: skip
        print(f"  ceiling {path.name} {way}: {rows[best]['images_per_s']} images/s at batch "
              f"{best}, promise {promise}", flush=True)  # fmt: skip
    kept = [m for m in measured if m["promise"] == "held"]
    if not kept:
        raise SystemExit(f"bench: no engine here keeps the promise of {path.name}")
    fastest = max(kept, key=lambda m: m["images_per_s"])
    way = Way(fastest["engine"], fastest["precision"], fastest["device"])
    worker = session(path, settings.device, way, settings.onnx_threads)
    return {
        "ways": measured,
        "not_offered": skipped,
        "way": fastest["way"],
        "instructions": fastest["instructions"],
        "best_batch": fastest["best_batch"],
        "images_per_s": fastest["images_per_s"],
        "all_cpus": {"threads": fastest["threads"], **fastest["batches"]},
        "per_worker": {"threads": settings.onnx_threads, **time_table(worker, seconds)},
    }


class Bare:
    """An engine alone, timed like a loaded file (`run(images)`): a way whose precision the
    file makes no promise for is never loaded as one, but what it would do is measured."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.names = engine, [port.name for port in engine.outputs]

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.engine.run(self.names, images)


def ceiling_session(path: Path, device: str, ceiling: dict) -> Classifier:
    """The session of the ceiling `measure_table` found (its way, every CPU), warmed up."""
    (fastest,) = [m for m in ceiling["ways"] if m["way"] == ceiling["way"]]
    model = session(path, device, Way(fastest["engine"], fastest["precision"], fastest["device"]))
    model.warm_up()
    return model


def time_table(model: Classifier | Bare, seconds: float) -> dict:
    """images/s, p50 and p99 ms of `model` at each of BATCH_SIZES, `seconds` each."""
    rows = {}
    for batch in BATCH_SIZES:
        ms = np.array(time_calls(model, batch, seconds)) * 1000
        rows[batch] = {
            "images_per_s": round(batch * len(ms) / (ms.sum() / 1000), 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
        }
    return rows


def time_calls(model: Classifier | Bare, batch: int, seconds: float) -> list[float]:
    """Seconds per engine call on `batch` random images, for `seconds` (3 calls at
    least), after one untimed call."""
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    model.run(images)  # warm-up, not timed
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        model.run(images)
        times.append(time.perf_counter() - t)
    return times


class Windows:
    """Short ceiling windows of one session at one batch size; every window is logged
    (its time since the first and its images/s), so the run shows how the machine drifted."""

    def __init__(self, model: Classifier, batch: int, seconds: float, label: str = "") -> None:
        self.model, self.batch, self.seconds, self.label = model, batch, seconds, label
        self.log: list[dict] = []
        self._started = time.perf_counter()

    def measure(self) -> float:
        """One window: images/s of the session at `batch` over `seconds`."""
        at = time.perf_counter() - self._started
        calls = time_calls(self.model, self.batch, self.seconds)
        images_per_s = round(self.batch * len(calls) / sum(calls), 1)
        self.log.append({"at_s": round(at, 1), "images_per_s": images_per_s})
        return images_per_s

    def summary(self) -> dict:
        values = [w["images_per_s"] for w in self.log]
        return {
            "label": self.label,
            "file": self.model.path.name,
            "batch": self.batch,
            "seconds": self.seconds,
            "count": len(values),
            "median": round(float(np.median(values)), 1) if values else None,
            "min": min(values, default=None),
            "max": max(values, default=None),
            "windows": self.log,
        }
