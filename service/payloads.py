"""Sampled payload logging: a share of the answered images, as the model saw them, with
the answer, in Parquet shards for `python -m training report --traffic` to read.

Off unless PAYLOAD_LOG names a folder. The data plane offers every answered request
(`PayloadLog.offer`); each image is kept with probability PAYLOAD_SAMPLE and put on a
bounded queue for one writer thread. The request never waits: a full queue drops the
image (counted), and so does a shard that cannot be written (a full or read-only disk).
What a row holds: the uint8 32x32x3 pixels after decoding and resizing, the model id and
version, the top classes with their probabilities, the familiarity (null for a file
without that output), the request id, the time, the route (a route template, or the
gRPC method's full name) and the time the version took from hand-over to answer. An image
a shadow candidate also answered (service/shadow.py) carries the candidate's version, top
classes, familiarity and time too, for `python -m training report --compare`. Never the
upload's bytes, the client's address or a key.

Shards are written whole to a temporary name and renamed, so a reader never sees half of
one; a shard is closed at PAYLOAD_SHARD_BYTES or PAYLOAD_SHARD_SECONDS, and the oldest are
deleted to keep the folder under PAYLOAD_MAX_BYTES. Each worker process writes its own
shards (its pid is in the name) and counts the whole folder against the cap.
"""

import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np

from contract.modelcard import FAMILIARITY_NAME, OUTPUT_NAME
from service.catalog import Served
from service.config import Settings
from service.context import RequestContext
from service.metrics import PAYLOAD_DROP_REASONS, Metrics
from service.outputs import top_classes
from service.schemas import DEFAULT_TOP_K

log = logging.getLogger(__name__)
SUFFIX = ".parquet"
# A row's bytes before compression beyond its pixels: the answer, ids, time and route.
ROW_OVERHEAD = 128


class CandidateAnswer(NamedTuple):
    """A shadow candidate's answer to a whole request (service/shadow.py)."""

    version: str
    probabilities: np.ndarray  # float32 [N, classes]
    familiarity: np.ndarray | None  # float32 [N], None without that output
    latency_ms: float


class CandidateRow(NamedTuple):
    version: str
    probabilities: np.ndarray  # float32 [classes], a copy
    familiarity: float | None
    latency_ms: float


class Row(NamedTuple):
    """One sampled image, as the request path hands it over (the writer does the rest)."""

    time: float  # seconds since the epoch
    request_id: str
    route: str
    image: int  # its position in the request
    model_id: str
    model_version: str
    class_names: list[str]  # the card's (shared, not copied)
    pixels: np.ndarray  # uint8 [32, 32, 3], a copy
    probabilities: np.ndarray  # float32 [classes], a copy
    familiarity: float | None
    latency_ms: float | None = None  # the request's hand-over to answer
    candidate: CandidateRow | None = None


class PayloadLog:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        assert settings.payload_log is not None
        self.folder = Path(settings.payload_log)
        self.sample = settings.payload_sample
        self.shard_bytes = settings.payload_shard_bytes
        self.shard_seconds = settings.payload_shard_seconds
        self.max_bytes = settings.payload_max_bytes
        # Bound once: `labels()` costs a lock and a lookup on every call.
        self.logged, self.bytes_on_disk = metrics.payloads_logged, metrics.payload_bytes
        self.dropped = {r: metrics.payloads_dropped.labels(r) for r in PAYLOAD_DROP_REASONS}
        self._queue: queue.Queue[Row | None] = queue.Queue(settings.payload_queue_images)
        self._random = random.Random()
        self._thread = threading.Thread(target=self._run, name="payload-writer", daemon=True)
        self._sequence = 0
        self._failing = False

    # --- the request path: sample, copy, hand over; never block ------------------------

    def offer(
        self,
        context: RequestContext,
        served: Served,
        images: np.ndarray,
        outputs: Mapping[str, np.ndarray],
        latency_ms: float | None = None,
        candidate: CandidateAnswer | None = None,
    ) -> None:
        """Sample the answered `images` of one request and queue the chosen ones, with a
        shadow candidate's answers to them when there was one."""
        chosen = [i for i in range(len(images)) if self._random.random() < self.sample]
        if not chosen:
            return
        now = time.time()
        probabilities = outputs[OUTPUT_NAME]
        familiarity = outputs.get(FAMILIARITY_NAME)
        names = served.model.card.class_names
        for i in chosen:
            other = None if candidate is None else CandidateRow(
                candidate.version, candidate.probabilities[i].copy(),
                None if candidate.familiarity is None else float(candidate.familiarity[i]),
                candidate.latency_ms)  # fmt: skip
            row = Row(now, context.request_id, context.operation.name, i, served.model_id,
                      served.version, names, images[i].copy(), probabilities[i].copy(),
                      None if familiarity is None else float(familiarity[i, 0]), latency_ms,
                      other)  # fmt: skip
            try:
                self._queue.put_nowait(row)
            except queue.Full:
                self.dropped["queue_full"].inc()

    # --- the writer thread ---------------------------------------------------------------

    def start(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # every shard will fail and be counted; serving goes on
            log.warning("payload log folder %s cannot be made: %s", self.folder, error)
        self.bytes_on_disk.set(self._on_disk()[1])
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued and stop (blocking: call it from a thread)."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    def _run(self) -> None:
        rows: list[Row] = []
        size, opened = 0, 0.0
        while True:
            wait = None if not rows else max(0.0, opened + self.shard_seconds - time.monotonic())
            with contextlib.suppress(queue.Empty):  # nothing came: the shard may be old enough
                row = self._queue.get(timeout=wait)
                if row is None:  # close(): the last shard, then stop
                    if rows:
                        self._write(rows)
                    return
                if not rows:
                    opened = time.monotonic()
                rows.append(row)
                size += row.pixels.nbytes + ROW_OVERHEAD
            if rows and (size >= self.shard_bytes
                         or time.monotonic() - opened >= self.shard_seconds):  # fmt: skip
                self._write(rows)
                rows, size = [], 0

    def _write(self, rows: list[Row]) -> None:
        """One shard: to a temporary name, then within the cap, then renamed into place."""
        self._sequence += 1
        stamp = datetime.fromtimestamp(rows[0].time, UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{os.getpid()}-{self._sequence:06d}{SUFFIX}"
        temporary = self.folder / f".{name}.tmp"
        try:
            write_table(rows, temporary)
            size = temporary.stat().st_size
            if size > self.max_bytes:
                temporary.unlink()
                self.dropped["over_cap"].inc(len(rows))
                return
            on_disk = self._make_room(size)
            temporary.rename(self.folder / name)
        except Exception as error:  # a full or read-only disk, or anything else: the
            # writer must outlive any one shard, or every later image would be dropped
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            self.dropped["write_error"].inc(len(rows))
            if not self._failing:  # once per run of failures, not once per shard
                log.warning("payload shard not written, its images dropped: %s", error)
            self._failing = True
            return
        self._failing = False
        self.logged.inc(len(rows))
        self.bytes_on_disk.set(on_disk + size)

    def _make_room(self, incoming: int) -> int:
        """Delete the oldest shards until `incoming` more bytes fit; the bytes left."""
        shards, total = self._on_disk()
        for path, size in shards:  # oldest first: names start with the UTC time
            if total + incoming <= self.max_bytes:
                break
            path.unlink(missing_ok=True)  # another worker may have deleted it first
            total -= size
        return total

    def _on_disk(self) -> tuple[list[tuple[Path, int]], int]:
        shards = []
        try:
            for path in sorted(self.folder.glob(f"*{SUFFIX}")):
                try:
                    shards.append((path, path.stat().st_size))
                except FileNotFoundError:
                    continue
        except OSError:
            pass
        return shards, sum(size for _, size in shards)


def write_table(rows: list[Row], path: Path) -> None:
    """The rows as one Parquet file at `path`."""
    # pyarrow is imported here, by the writer thread, so workers that log nothing never
    # load it (it is tens of MB of resident memory).
    import pyarrow as pa
    import pyarrow.parquet as pq

    from contract.columns import PAYLOAD_SCHEMA

    probabilities = np.stack([row.probabilities for row in rows])
    best = top_classes(probabilities, DEFAULT_TOP_K)
    # A shadow candidate's answers, null on the rows that had none.
    others = [row.candidate for row in rows]
    theirs: list = [None] * len(rows)
    their_best: list = [None] * len(rows)
    if shadowed := [i for i, other in enumerate(others) if other is not None]:
        stacked = np.stack([others[i].probabilities for i in shadowed])
        top = top_classes(stacked, DEFAULT_TOP_K)
        chosen = np.take_along_axis(stacked, top, axis=1).tolist()
        for j, i in enumerate(shadowed):
            their_best[i], theirs[i] = top[j].tolist(), chosen[j]
    table = pa.table(
        {
            "time": [round(row.time * 1000) for row in rows],
            "request_id": [row.request_id for row in rows],
            "route": [row.route for row in rows],
            "image": [row.image for row in rows],
            "model_id": [row.model_id for row in rows],
            "model_version": [row.model_version for row in rows],
            "pixels": [row.pixels.tobytes() for row in rows],
            "top_classes": best.tolist(),
            "top_labels": [
                [row.class_names[i] for i in top] for row, top in zip(rows, best, strict=True)
            ],
            "top_probabilities": np.take_along_axis(probabilities, best, axis=1).tolist(),
            "familiarity": [row.familiarity for row in rows],
            "latency_ms": [row.latency_ms for row in rows],
            "candidate_version": [None if o is None else o.version for o in others],
            "candidate_top_classes": their_best,
            "candidate_top_probabilities": theirs,
            "candidate_familiarity": [None if o is None else o.familiarity for o in others],
            "candidate_latency_ms": [None if o is None else o.latency_ms for o in others],
        },
        schema=PAYLOAD_SCHEMA,
    )
    with open(path, "wb") as file:  # on disk before the rename makes it a shard
        # No min/max statistics of the pixels: two more images' worth of bytes per page.
        statistics = [name for name in table.column_names if name != "pixels"]
        pq.write_table(table, file, write_statistics=statistics)
        file.flush()
        os.fsync(file.fileno())


def payload_log(settings: Settings, metrics: Metrics) -> PayloadLog | None:
    """The log PAYLOAD_LOG asks for, started; None when it is unset."""
    if settings.payload_log is None:
        return None
    payloads = PayloadLog(settings, metrics)
    payloads.start()
    return payloads
