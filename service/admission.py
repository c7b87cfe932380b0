"""Admission at the door: refuse at once what could not be answered in time.

A bounded queue of images bounds memory, not latency: under an open loop (requests that
arrive whether or not earlier ones were answered) requests wait *before* they reach it,
being read, parsed and decoded by a saturated event loop, and the work spent on them is
lost when they are shed at the queue. So each worker decides at the door, from the
headers alone, before the body is read or anything decoded:

    expected wait = (time since the request's first byte was parsed)
                  + (inference requests already admitted here) x (seconds per request)

and answers 503 with Retry-After at once when that is above MAX_QUEUE_DELAY_MS. Seconds
per request is measured, not configured: this worker's busy time (some inference request
in the system) over the requests it completed, in windows of WINDOW_SECONDS, smoothed.
Busy time over completions is the reciprocal of the rate this worker actually answers
at, with whatever batching the load gives it, so the bound follows the machine, the
model and the request mix (Triton's queue policy bounds the queue by a delay too; here
the delay is estimated before the request costs anything).

A request is always admitted into an empty worker: the bound sheds queueing, never the
only request.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

ARRIVED = "arrived"  # scope["state"] key: time.monotonic() when its first byte was parsed
WINDOW_SECONDS = 0.2  # busy time per measurement of the service rate
SMOOTHING = 0.3  # weight of the newest window in the average


@dataclass
class Admission:
    max_delay: float  # seconds; 0 turns the bound off
    clock: Callable[[], float] = field(default=time.monotonic)
    in_system: int = 0  # inference requests admitted and not yet answered (this worker)
    seconds_per_request: float = 0.0  # measured; 0 until the first window
    _busy: float = 0.0  # busy seconds in the current window, up to _busy_since
    _busy_since: float | None = None
    _done: int = 0  # completions in the current window

    def expected_wait(self, now: float, arrived: float | None) -> float:
        waited = 0.0 if arrived is None else max(0.0, now - arrived)
        return waited + self.in_system * self.seconds_per_request

    def admit(self, arrived: float | None = None) -> float | None:
        """None when admitted (the caller must call `leave` once it is answered); else
        the expected wait that got it refused."""
        now = self.clock()
        wait = self.expected_wait(now, arrived)
        if self.max_delay and self.in_system and wait > self.max_delay:
            return wait
        if self.in_system == 0:
            self._busy_since = now
        self.in_system += 1
        return None

    def leave(self) -> None:
        now = self.clock()
        self.in_system -= 1
        self._done += 1
        busy = self._busy + (now - self._busy_since if self._busy_since is not None else 0.0)
        if busy >= WINDOW_SECONDS:
            sample = busy / self._done
            self.seconds_per_request = (
                sample
                if not self.seconds_per_request
                else SMOOTHING * sample + (1 - SMOOTHING) * self.seconds_per_request
            )
            busy, self._done = 0.0, 0
        # Busy time so far is carried until the window fills; the clock runs while busy.
        self._busy, self._busy_since = busy, (now if self.in_system else None)
