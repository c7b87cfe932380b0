"""Admission at the door: refuse at once what could not be answered in time.

A bounded queue of images bounds memory, not latency: under an open loop (requests that
arrive whether or not earlier ones were answered) requests wait *before* they reach it,
being read, parsed and decoded by a saturated event loop, and the work spent on them is
lost when they are shed at the queue. So each worker decides at the door, from the
headers alone, before the body is read or anything decoded:

    expected wait = (time since the request's first byte was parsed)
                  + (inference requests here whose body is in) / (images per second)

and answers 503 with Retry-After at once when that is above MAX_QUEUE_DELAY_MS (Triton's
queue policy bounds the queue by a delay too; here it is decided before the request
costs anything). Images per second is measured, not configured: the images the model's
batches computed over the seconds they took, in windows of WINDOW_SECONDS of compute,
smoothed. It is the rate of the batches themselves, so it rises as load makes batches
larger, and shedding (which keeps batches smaller) cannot talk it down. A first try that
measured busy time per completed request instead collapsed: at light load that is the
latency of small batches, the bound came out tight, shedding kept batches small, and a
worker at half load shed most of its requests.

Requests are counted as one image each (the door has not read how many a body holds),
from the moment their body is in: a request still uploading waits for its client, not for
the model, and counting it from the door let a few hundred slow uploads make the door
refuse everyone else (the faults benchmark's slow-clients row did exactly that). A request
is always admitted into an empty worker: the bound sheds queueing, never the only one.

`Door.refuse` decides from the request's context (service/context.py), whichever
transport built it; each transport answers the refusal its own way, as early as it can (over
HTTP it is the first thing the one middleware asks: no request id, no access line, no
body). A
counter (`requests_shed_at_door_total`) and at most one log line a second say how many
were refused.
"""

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter

from service.context import RequestContext
from service.errors import Overloaded

log = logging.getLogger(__name__)

WINDOW_SECONDS = 0.2  # compute time per measurement of the rate
SMOOTHING = 0.3  # weight of the newest window in the average


@dataclass
class Admission:
    max_delay: float  # seconds; 0 turns the bound off
    clock: Callable[[], float] = field(default=time.monotonic)
    in_system: int = 0  # inference requests with their body in, not yet answered (worker)
    images_per_second: float = 0.0  # measured from the batches; 0 until the first window
    _images: int = 0  # in the current window
    _seconds: float = 0.0

    def expected_wait(self, now: float, arrived: float | None) -> float:
        waited = 0.0 if arrived is None else max(0.0, now - arrived)
        rate = self.images_per_second
        return waited + (self.in_system / rate if rate else 0.0)

    def admit(self, arrived: float | None = None) -> float | None:
        """None when admitted; else the expected wait that got it refused."""
        wait = self.expected_wait(self.clock(), arrived)
        if self.max_delay and self.in_system and wait > self.max_delay:
            return wait
        return None

    def enter(self) -> None:
        """An admitted request's body is in: it now waits for the model."""
        self.in_system += 1

    def leave(self) -> None:
        """A request that entered is answered (or gone)."""
        self.in_system -= 1

    def batch_ran(self, size: int, seconds: float) -> None:
        """A batch of `size` images took `seconds` (the batchers of every model here)."""
        self._images += size
        self._seconds += seconds
        if self._seconds >= WINDOW_SECONDS:
            sample = self._images / self._seconds
            previous = self.images_per_second
            self.images_per_second = (
                sample if not previous else SMOOTHING * sample + (1 - SMOOTHING) * previous
            )
            self._images, self._seconds = 0, 0.0


class Door:
    """Admission's decision for one request, counted and logged."""

    def __init__(self, admission: Admission, refused: Counter) -> None:
        self.admission, self.refused = admission, refused
        self._children: dict[str, Counter] = {}
        self._logged_at, self._unlogged = 0.0, 0

    def expect(self, names: Iterable[str]) -> None:
        """Count refusals of these operations from zero, so their series exist before the
        first refusal (the shedding ratio's rules read them as 0, not as missing)."""
        for name in names:
            self._children.setdefault(name, self.refused.labels(name))

    def refuse(self, context: RequestContext) -> Overloaded | None:
        """None when `context` may come in (or is not an inference); else the error to
        answer with at once (503 + Retry-After over HTTP, RESOURCE_EXHAUSTED over gRPC)."""
        if not context.operation.inference:
            return None
        wait = self.admission.admit(context.arrived)
        if wait is None:
            return None
        name = context.operation.name
        if (child := self._children.get(name)) is None:
            child = self._children[name] = self.refused.labels(name)
        child.inc()
        self._unlogged += 1
        if (now := time.monotonic()) - self._logged_at >= 1.0:
            log.warning("shedding at the door", extra={
                "refused": self._unlogged, "expected_wait_ms": round(wait * 1000, 1),
                "in_system": self.admission.in_system,
                "images_per_second": round(self.admission.images_per_second, 1),
            })  # fmt: skip
            self._logged_at, self._unlogged = now, 0
        return Overloaded(
            f"overloaded: this request would wait about {wait * 1000:.0f} ms, above "
            f"MAX_QUEUE_DELAY_MS ({self.admission.max_delay * 1000:g}); retry shortly"
        )
