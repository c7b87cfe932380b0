"""One request, as every transport describes it to the core.

Each transport (HTTP in service/http/, gRPC in service/rpc/) builds a `RequestContext`
when a request arrives: which operation it is, its id, when it arrived, its deadline, the
caller's credentials and how to notice the caller leaving. Admission, deadlines, keys,
metrics and the access log take their decisions from it, never from a URL or an RPC
name; the data plane fills in what happened (model, version, images, timings), and the
transport reads that back once, at the end, for the metrics and the access line.
"""

import math
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

VALID_ID = re.compile(r"[\w.:@/+=-]{1,128}", re.ASCII)  # what we echo back and log, verbatim


def request_id(sent: str | None) -> str:
    """The caller's request id when it is a sane one, else a new one."""
    return sent if sent is not None and VALID_ID.fullmatch(sent) else uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class Operation:
    """What a request asks for, as far as the per-request policies care."""

    name: str  # the metrics label of the door's refusals: a route template or an RPC
    inference: bool = False  # it queues for a model: admitted at the door, counted there
    v2: bool = False  # the Open Inference Protocol's (its errors say {"error": ...})


OTHER = Operation("other")
OTHER_V2 = Operation("other", v2=True)


@dataclass(slots=True)
class RequestContext:
    """What one request is and what it did, filled in as it goes."""

    request_id: str
    operation: Operation = OTHER
    arrived: float | None = None  # time.monotonic() when its first byte was read, if known
    deadline: float = math.inf  # on the event loop's clock
    credentials: str = ""  # the `authorization` value the caller sent ("" if none)
    rollout_key: str = ""  # `X-Rollout-Key`: who the caller is for a canary ("" if none)
    # Returns once the caller has gone (None: the transport cancels the task itself).
    gone: Callable[[], Awaitable[None]] | None = None
    # What the data plane did, for the metrics and the access line.
    model_id: str = ""
    model_version: str = ""
    images: int | None = None
    queue_ms: float | None = None
    inference_ms: float | None = None

    def start_deadline(self, now: float, seconds: float) -> float:
        """The deadline `seconds` from `now` (loop clock), never later than one already set."""
        self.deadline = min(self.deadline, now + seconds)
        return self.deadline
