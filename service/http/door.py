"""Each request's context, and admission at the door.

`operation_of` is the one place an HTTP path becomes an operation (service/context.py):
every policy after it asks the context, not the URL. An inference request the door
refuses (service/admission.py) costs next to nothing: the server's HTTP protocol asks
the `Gate` as soon as the request's head is parsed and writes the 503 itself, before
any ASGI code runs (service/server.py: no task, no scope handed on, no body read); the
middleware (service/http/middleware.py) asks the door only for a request the protocol
did not ask for (one pipelined behind another, or an app served some other way).
"""

import json
import threading
from dataclasses import dataclass

from starlette.types import Message, Scope

from service.admission import Door
from service.context import OTHER, OTHER_V2, Operation, RequestContext, request_id
from service.http.errors import CONTEXT, error_body

ARRIVED = "arrived"  # scope["state"] key: time.monotonic() when its first byte was parsed
GATE = "gate"  # lifespan state key: the Gate the server's protocol asks
ADMITTED = "admitted"  # scope["state"] key: the protocol asked the door and it said yes
REQUEST_ID = b"x-request-id"
ROLLOUT_KEY = b"x-rollout-key"  # who the caller is for a canary (service/rollout.py)
CLOSE = (b"connection", b"close")

PREDICT = Operation("/predict", inference=True)
EXPLAIN = Operation("/explain", inference=True)
V2_INFER = Operation("/v2/models/{model_name}/infer", inference=True, v2=True)
V2_EXPLAIN = Operation("/v2/models/{model_name}/explain", inference=True, v2=True)
INFERENCE = (PREDICT, EXPLAIN, V2_INFER, V2_EXPLAIN)


def operation_of(method: str, path: str) -> Operation:
    """What an HTTP request is: inference routes queue for a model; /v2 speaks v2."""
    v2 = path.startswith("/v2")
    if method == "POST":
        if path == "/predict":
            return PREDICT
        if path == "/explain":
            return EXPLAIN
        if v2 and path.startswith("/v2/models/"):
            if path.endswith("/infer"):
                return V2_INFER
            if path.endswith("/explain"):
                return V2_EXPLAIN
    return OTHER_V2 if v2 else OTHER


def context_of(scope: Scope) -> RequestContext:
    return scope["state"][CONTEXT]


def request_id_of(scope: Scope) -> str:
    """The client's `X-Request-ID` when it is a sane one, else a new one."""
    sent = next((v for k, v in scope["headers"] if k == REQUEST_ID), None)
    return request_id(None if sent is None else sent.decode("latin-1"))


def refusal(operation: Operation, message: str, draining: bool) -> tuple[Message, Message]:
    """The door's 503: its two ASGI messages. Kept alive: the connection is fine, only
    this request came too late; the server discards its body as it arrives. Closed while
    draining for shutdown, like every other answer then, so the client reconnects
    elsewhere."""
    body = json.dumps(error_body(operation, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"1"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    if draining:
        headers.append(CLOSE)
    start = {"type": "http.response.start", "status": 503, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


@dataclass(frozen=True, slots=True)
class Gate:
    """The door as the HTTP protocol asks it, from the request line alone. The app's
    lifespan hands it to the server through the lifespan state (the ASGI way for an
    app to give its server something), so each worker's protocol asks its own door."""

    door: Door
    draining: threading.Event

    def refuse(
        self, method: str, path: str, arrived: float | None
    ) -> tuple[Message, Message] | None:
        """None when the request may come in; else the refusal's two ASGI messages."""
        operation = operation_of(method, path)
        refused = self.door.refuse(RequestContext("", operation, arrived))
        if refused is None:
            return None
        return refusal(operation, refused.message, self.draining.is_set())
