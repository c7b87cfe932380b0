"""Measurements that hold still on a machine whose speed drifts.

The same ceiling measured an hour apart on one machine gave 1,251 and 880 images/s, so a
service row divided by a ceiling taken minutes earlier carries the drift in its ratio.
Here every row runs between two ceiling windows (window, row, window, row, window...: a
window after one row is the window before the next), its ratio is taken to the mean of
the two windows next to it, and rows that are judged run `repeats` times, each repeat
with its own adjacent ceiling: a row reports the median of its runs and their spread
(min-max), and a target is judged on the median.

The arithmetic is plain functions, so it is tested on known numbers.
"""

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.ceiling import Windows

# What defines a row: the same in all its runs.
CONSTANT_KEYS = ("concurrency", "images_per_request", "load")
# Per-run values a row reports as the median over its runs (with min-max for SPREAD).
MEDIAN_KEYS = (
    "rps", "images_per_s", "p50_ms", "p95_ms", "p99_ms", "shed_p50_ms", "shed_p99_ms",
    "ceiling", "share_of_ceiling", "server_cpu_ms", "client_cpu_ms", "cpu_bound_share",
    "goodput_of_capacity", "goodput_of_capacity_raw", "rate", "ceiling_cpu_ms_per_image",
    "client_cpu_share",
)  # fmt: skip
SPREAD_KEYS = ("rps", "images_per_s", "p50_ms", "p99_ms", "share_of_ceiling",
               "goodput_of_capacity", "shed_p99_ms")  # fmt: skip
DIGITS = {"rps": 1, "images_per_s": 1, "rate": 1, "ceiling": 1, "p50_ms": 2, "p95_ms": 2,
          "p99_ms": 2, "shed_p50_ms": 2, "shed_p99_ms": 2, "server_cpu_ms": 3,
          "client_cpu_ms": 3, "ceiling_cpu_ms_per_image": 3}  # fmt: skip
# Counts a row reports as the sum over its runs (one error in one run is not hidden).
COUNT_KEYS = ("requests", "sent", "unsent", "shed", "shed_without_retry_after", "refused",
              "errors")  # fmt: skip


def adjacent_ceiling(before: float, after: float | None) -> float:
    """The ceiling a row is compared with: the mean of the windows just before and just
    after it (the one before alone when there is no after)."""
    return before if after is None else (before + after) / 2


def spread(values: list[float | None]) -> dict | None:
    """Median, min, max and count of the values measured (None: not measured)."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    return {
        "median": round(statistics.median(known), 4),
        "min": round(min(known), 4),
        "max": round(max(known), 4),
        "n": len(known),
    }


def annotate(run: dict, before: float, after: float | None, ceiling_threads: int) -> dict:
    """A load run's derived values, from the ceiling windows next to it: images/s, its
    share of the adjacent ceiling, CPU per answered request (server, load generator) and
    the share of the ceiling that CPU allows."""
    ceiling = adjacent_ceiling(before, after)
    images_per_s = run["rps"] * run.get("images_per_request", 1)
    answered = max(run["requests"], 1)
    server_ms = run.get("server_cpu_s")
    client_ms = run.get("client_cpu_s")
    server_ms = None if server_ms is None else round(server_ms * 1000 / answered, 3)
    client_ms = None if client_ms is None else round(client_ms * 1000 / answered, 3)
    # CPU the ceiling spends per image (every thread busy for the whole call), against
    # what a request costs server and generator together on the same CPUs.
    ceiling_cpu_ms = ceiling_threads * 1000 / ceiling if ceiling else None
    per_image = (server_ms + client_ms) / run.get("images_per_request", 1) if (
        server_ms and client_ms) else None  # fmt: skip
    # The generator's CPU over the run as a share of every CPU (the ceiling's threads).
    client_s, seconds = run.get("client_cpu_s"), run.get("seconds")
    client_share = None
    if client_s is not None and seconds:
        client_share = client_s / (seconds * ceiling_threads)
    return {
        **run,
        "ceiling_before": before,
        "ceiling_after": after,
        "ceiling": round(ceiling, 1),
        "images_per_s": round(images_per_s, 1),
        "share_of_ceiling": round(images_per_s / ceiling, 4) if ceiling else None,
        "server_cpu_ms": server_ms,
        "client_cpu_ms": client_ms,
        "client_cpu_share": None if client_share is None else round(client_share, 4),
        "ceiling_cpu_ms_per_image": round(ceiling_cpu_ms, 3) if ceiling_cpu_ms else None,
        "cpu_bound_share": round(ceiling_cpu_ms / per_image, 4)
        if ceiling_cpu_ms and per_image
        else None,
    }


def goodput_of_capacity(run: dict, capacity: dict) -> dict:
    """An open-loop run's goodput as a share of the closed-loop capacity: raw (goodput /
    capacity req/s) and as measured against the ceiling (goodput's share of its adjacent
    ceiling over the capacity's median share of its own), which is the raw share when the
    machine holds still and does not move when it drifts between the two."""
    raw = run["rps"] / capacity["rps"] if capacity["rps"] else None
    held = (
        run["share_of_ceiling"] / capacity["share_of_ceiling"]
        if run.get("share_of_ceiling") is not None and capacity.get("share_of_ceiling")
        else None
    )
    return {
        **run,
        "goodput_of_capacity_raw": None if raw is None else round(raw, 4),
        "goodput_of_capacity": None if held is None else round(held, 4),
    }


def combine(runs: list[dict]) -> dict:
    """The runs of one row as one: what defines the row (CONSTANT_KEYS), medians of
    MEDIAN_KEYS, sums of COUNT_KEYS, `spread` ([min, max]) of SPREAD_KEYS, `runs` (the
    count) and `each` (every run as measured)."""
    row = {key: runs[0][key] for key in CONSTANT_KEYS if key in runs[0]}
    if any(r.get(key) != row.get(key) for r in runs for key in row):
        raise ValueError(f"runs of different rows combined: {[r.get('concurrency') for r in runs]}")
    for key in MEDIAN_KEYS:
        if any(key in r for r in runs):
            s = spread([r.get(key) for r in runs])
            row[key] = None if s is None else round(s["median"], DIGITS.get(key, 4))
            if key in SPREAD_KEYS:
                row.setdefault("spread", {})[key] = None if s is None else [s["min"], s["max"]]
    for key in COUNT_KEYS:
        if any(key in r for r in runs):
            row[key] = sum(r.get(key, 0) for r in runs)
    row["runs"] = len(runs)
    row["each"] = runs
    return row


def unchanged(run: dict) -> dict:
    return run


@dataclass
class Row:
    """One row of a table: `load` runs it once (a load run's dict), `repeats` times in
    all, each run passed through `then` once annotated."""

    load: Callable[[], dict]
    repeats: int = 1
    then: Callable[[dict], dict] = field(default=unchanged)


class Interleaved:
    """Rows of one server between ceiling windows of `windows`: window, row, window,
    row, window. `measure` gives a run its adjacent ceilings; rows run in passes
    (`run_passes`), so that the repeats of a row are minutes apart, not back to back."""

    def __init__(self, windows: Windows, ceiling_threads: int) -> None:
        self.windows, self.threads = windows, ceiling_threads
        self._last: float | None = None  # the window after the last row: the next's before

    def measure(self, load: Callable[[], dict]) -> dict:
        """One run of `load`, between two windows, annotated."""
        before = self._last if self._last is not None else self.windows.measure()
        run = load()
        self._last = self.windows.measure()
        return annotate(run, before, self._last, self.threads)

    def run_passes(self, rows: list[Row]) -> list[dict]:
        """Pass k runs, in order, the rows with more than k repeats; returns each row's
        runs combined, in the order of `rows`."""
        runs: list[list[dict]] = [[] for _ in rows]
        for k in range(max((row.repeats for row in rows), default=0)):
            for i, row in enumerate(rows):
                if row.repeats > k:
                    runs[i].append(row.then(self.measure(row.load)))
        return [combine(r) for r in runs]


def ratio_windows(numerator: Windows, denominator: Windows, pairs: int) -> dict:
    """`numerator`'s speed over `denominator`'s (int8 over float), from alternating
    windows d, n, d, n, ..., d: each n over the mean of the d windows either side; the
    median and spread of the `pairs` ratios."""
    ratios = []
    before = denominator.measure()
    for _ in range(pairs):
        n = numerator.measure()
        after = denominator.measure()
        ratios.append(n / adjacent_ceiling(before, after))
        before = after
    return {"ratios": [round(r, 4) for r in ratios], **(spread(ratios) or {})}
