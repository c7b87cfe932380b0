"""What the hardware does: raw onnxruntime, no server, in the harness's own process.

Two measures. The table: one session on every CPU available (the headline) and one with
the service's session options (one worker's threads), at batch 1, 8, 32 and 128. And
windows: short runs of the all-CPU session at its best batch size, taken between the
service's rows while the server idles, so each row is compared with the ceiling of the
minutes it ran in (bench/steady.py) rather than with one taken before a drift.
"""

import time
from pathlib import Path

import numpy as np

from contract.classifier import Classifier
from service.config import Settings, available_cpus

BATCH_SIZES = (1, 8, 32, 128)


def all_cpu_session(path: Path, device: str) -> Classifier:
    """The ceiling's session: every CPU available to one onnxruntime session."""
    return Classifier(path, device, available_cpus(), 1)


def measure_table(path: Path, settings: Settings, seconds: float) -> dict:
    """The all-CPU session and one worker's, at each batch size of BATCH_SIZES for
    `seconds` each; `images_per_s` and `best_batch` are the all-CPU session's best."""
    all_cpus = all_cpu_session(path, settings.device)
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
            print(f"  ceiling {path.name} {name} batch {batch:>3}: {rows[batch]}", flush=True)
        result[name] = rows
    best = max(BATCH_SIZES, key=lambda b: result["all_cpus"][b]["images_per_s"])
    result["best_batch"] = best
    result["images_per_s"] = result["all_cpus"][best]["images_per_s"]
    return result


def time_calls(model: Classifier, batch: int, seconds: float) -> list[float]:
    """Seconds per onnxruntime call on `batch` random images, for `seconds` (3 calls at
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
