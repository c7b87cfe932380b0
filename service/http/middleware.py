"""The HTTP transport's one middleware: every request's way in and out, as one pure ASGI
layer (one wrapper each for receive and send, no per-request task, no body copy).

In order, for each request:
1. its context (door.py) and the door (service/admission.py), unless the server's
   protocol asked it already (service/server.py does, before any ASGI code runs): an
   inference request that would wait too long is refused here, before anything else is
   spent on it (no request id, no access line, no body read);
2. one pass over the headers: its request id (returned on every response, errors too),
   `X-Request-Timeout`, `Content-Length` and `X-Rollout-Key` (service/rollout.py);
3. the API key, when keys are set (keys.py), and the bounds (limits.py), each refused
   before the body is read;
4. the app, with the body bounded as it streams in and counted by admission once it is
   in (from then on the request waits for the model, not for its client): for an
   inference request matching one of the `direct` routes (/v2 infer), that route's bare
   ASGI app, called here with nothing between (service/routes/v2.py); else the
   FastAPI app with its router;
5. its metrics and one access line (service/metrics.py), under its route's template
   (record.py), whatever happened.

Merged into one layer because each ASGI layer costs every request a call, two closures
and an await per message (`python -m bench floor` measures it).
"""

import asyncio
import time
from collections.abc import Sequence

from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.context import Operation, RequestContext, request_id
from service.dataplane import DataPlane
from service.http.asgi import DirectRoute, answer_of
from service.http.door import (
    ADMITTED,
    ARRIVED,
    CLOSE,
    INFERENCE,
    REQUEST_ID,
    ROLLOUT_KEY,
    operation_of,
    refusal,
)
from service.http.errors import CONTEXT, error_response
from service.http.keys import ApiKeys
from service.http.limits import BAD_TIMEOUT, BINARY_HEADER, TIMEOUT_HEADER, Limits, seconds
from service.http.record import route_template

CLOSING = {"Connection": "close"}  # an answer that leaves the body unread ends the connection
BUSY = {**CLOSING, "Retry-After": "1"}


class HttpMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        plane: DataPlane,
        keys: ApiKeys | None = None,
        direct: Sequence[DirectRoute] = (),
    ) -> None:
        self.app = app
        self.direct = tuple(direct)
        self.door, self.admission = plane.door, plane.admission
        self.draining = plane.draining
        self.metrics = plane.metrics
        self.limits = Limits(plane.settings)
        self.keys = keys
        self.door.expect(op.name for op in INFERENCE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        operation = operation_of(scope["method"], scope["path"])
        context = RequestContext("", operation, state.get(ARRIVED))
        if not state.get(ADMITTED) and (refused := self.door.refuse(context)) is not None:
            start, body = refusal(operation, refused.message, self.draining.is_set())
            await send(start)
            return await send(body)
        state[CONTEXT] = context
        started = time.perf_counter()
        limits = self.limits
        timeout, bad_timeout, declared, sent_id = limits.request_timeout, False, 0, None
        binary = False
        for name, value in scope["headers"]:
            if name == REQUEST_ID:
                sent_id = value
            elif name == BINARY_HEADER:
                binary = True
            elif name == TIMEOUT_HEADER:
                if (asked := seconds(value)) is None:
                    bad_timeout = True
                else:
                    timeout = min(timeout, asked)
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
            elif name == ROLLOUT_KEY:
                context.rollout_key = value.decode("latin-1")
        context.request_id = request_id(None if sent_id is None else sent_id.decode("latin-1"))
        id_header = (REQUEST_ID, context.request_id.encode())
        draining, status = self.draining, 500

        async def send_recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), id_header]  # never the response's own
                if draining.is_set():
                    headers.append(CLOSE)
                message["headers"] = headers
            await send(message)

        if not operation.v2:
            max_body, too_large = limits.max_body, limits.too_large
        elif binary:
            max_body, too_large = limits.max_v2_binary, limits.too_large_v2_binary
        else:
            max_body, too_large = limits.max_v2_body, limits.too_large_v2
        reserved = 0
        entered = False
        try:
            if self.keys is not None and (answer := self.keys.refusal(scope, context)):
                return await answer(scope, receive, send_recorded)
            if bad_timeout:
                answer = error_response(operation, 400, BAD_TIMEOUT, CLOSING)
                return await answer(scope, receive, send_recorded)
            if declared > max_body:  # on the header alone, in the words used mid-stream
                answer = error_response(operation, 413, too_large, CLOSING)
                return await answer(scope, receive, send_recorded)
            if limits.in_flight + declared > limits.budget:
                answer = error_response(operation, 503, limits.busy(), BUSY)
                return await answer(scope, receive, send_recorded)
            loop = asyncio.get_running_loop()
            deadline = context.start_deadline(loop.time(), timeout)
            reserved = declared
            limits.in_flight += reserved
            received, body_done = 0, False
            admission = self.admission if operation.inference else None

            async def receive_bounded() -> Message:
                nonlocal body_done, received, reserved, entered
                if body_done:  # later receives wait for the disconnect: no bound wanted there
                    return await receive()
                left = deadline - loop.time()
                try:
                    async with asyncio.timeout(min(limits.body_timeout, max(left, 0))):
                        message = await receive()
                except TimeoutError:
                    raise HTTPException(408, limits.late(left, timeout), headers=CLOSING) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > max_body:  # refused while it streams in, never buffered
                        raise HTTPException(413, too_large, headers=CLOSING)
                    if received > reserved:  # a chunked body: counted as it arrives
                        limits.in_flight += received - reserved
                        reserved = received
                        if limits.in_flight > limits.budget:
                            raise HTTPException(503, limits.busy(), headers=BUSY)
                    body_done = not message.get("more_body")
                else:
                    body_done = True
                if body_done and admission is not None:  # in: it now waits for the model
                    entered = True
                    admission.enter()
                return message

            await self.app_for(scope, operation)(scope, receive_bounded, send_recorded)
        finally:
            limits.in_flight -= reserved
            if entered:
                self.admission.leave()
            self.metrics.finish(context, route_template(scope), scope["method"], str(status),
                                time.perf_counter() - started)  # fmt: skip

    def app_for(self, scope: Scope, operation: Operation) -> ASGIApp:
        """The direct route's app when an inference request matches one (its path
        parameters and route put in the scope, as a router would), else the app."""
        if operation.inference:
            for route in self.direct:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)
                    scope["route"] = route  # its template labels the metrics (record.py)
                    return answer_of(scope, route)
        return self.app
