"""Per-request bounds over HTTP, as one pure ASGI middleware (no per-request task, no body copy).

- A deadline for every request: REQUEST_TIMEOUT_SECONDS, shortened by an
  `X-Request-Timeout` header (seconds). The inference path drops work past it (504).
- A bound on the body that fits its protocol: for the Open Inference Protocol, the
  largest valid inference request (service/codec.py: every value of
  MAX_IMAGES_PER_REQUEST images spelt out in JSON);
  elsewhere every image at its upload limit. Refused from the Content-Length header or,
  without one, as soon as the stream crosses it (413).
- A bound on waiting for the body: a client that stops sending mid-body (or sends less
  than its Content-Length) gets 408 after BODY_TIMEOUT_SECONDS of silence, and one that
  trickles it gets 408 at the request's deadline; the connection is closed.
- A budget for all bodies at once: MAX_BODY_BYTES_IN_FLIGHT, reserved from Content-Length
  (or counted as a chunked body streams in) and released when the response is done;
  beyond it 503 with Retry-After, before anything is read.
- While the server drains for shutdown, every response says `Connection: close`, so
  keep-alive clients reconnect (elsewhere) instead of meeting a closed socket.

Header-level limits (size, time to send the headers) live in service/server.py: they
apply before a request reaches any ASGI code.
"""

import asyncio
import math
import threading

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.codec import max_request_bytes
from service.config import Settings
from service.http.door import context_of
from service.http.errors import error_response

TIMEOUT_HEADER = b"x-request-timeout"


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, draining: threading.Event) -> None:
        self.app = app
        self.settings = settings
        self.max_body = settings.max_request_bytes
        self.max_v2_body = max_request_bytes(settings.max_images_per_request)
        # The 413 messages, worded once: a request only picks one.
        self.too_large = body_too_large(settings)
        self.too_large_v2 = (
            f"the request body is above {self.max_v2_body:,} bytes, the largest valid "
            f"inference request of {settings.max_images_per_request} images"
        )
        self.request_timeout = settings.request_timeout_seconds
        self.body_timeout = settings.body_timeout_seconds
        self.draining = draining
        self.budget = settings.max_body_bytes_in_flight
        self.in_flight = 0  # body bytes reserved by requests under way (one event loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timeout = self.request_timeout
        context = context_of(scope)
        v2 = context.operation.v2
        max_body = self.max_v2_body if v2 else self.max_body
        too_large = self.too_large_v2 if v2 else self.too_large
        declared = 0
        for name, value in scope["headers"]:
            if name == TIMEOUT_HEADER:
                asked = _seconds(value)
                if asked is None:
                    message = "X-Request-Timeout must be a positive number of seconds"
                    return await _refuse(400, message, scope, receive, send)
                timeout = min(timeout, asked)
            elif name == b"content-length" and value.isdigit():
                declared = int(value)
                if declared > max_body:  # on the header alone, in the words used mid-stream
                    return await _refuse(413, too_large, scope, receive, send)
        if self.in_flight + declared > self.budget:
            return await _refuse(503, self._busy(), scope, receive, send, {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        deadline = context.start_deadline(loop.time(), timeout)
        body_done, received, reserved = False, 0, declared
        self.in_flight += reserved

        async def receive_bounded() -> Message:
            nonlocal body_done, received, reserved
            if body_done:  # later receives wait for the disconnect: no bound wanted there
                return await receive()
            left = deadline - loop.time()
            try:
                async with asyncio.timeout(min(self.body_timeout, max(left, 0))):
                    message = await receive()
            except TimeoutError:
                why = (
                    f"no body data for {self.body_timeout:g} s"
                    if left > self.body_timeout
                    else f"the body did not arrive within the request's {timeout:g} s"
                )
                raise HTTPException(408, f"{why}; send the whole body promptly",
                                    headers={"Connection": "close"}) from None  # fmt: skip
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:  # refused while it streams in, never buffered
                    raise HTTPException(413, too_large, headers={"Connection": "close"})
                if received > reserved:  # a chunked body: counted as it arrives
                    self.in_flight += received - reserved
                    reserved = received
                    if self.in_flight > self.budget:
                        raise HTTPException(503, self._busy(), headers={
                            "Connection": "close", "Retry-After": "1"})  # fmt: skip
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining.is_set():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, receive_bounded, send_closing)
        finally:
            self.in_flight -= reserved

    def _busy(self) -> str:
        return (f"the server is already receiving {self.in_flight:,} bytes of request bodies "
                f"(MAX_BODY_BYTES_IN_FLIGHT {self.budget:,}); retry shortly")  # fmt: skip


def body_too_large(settings: Settings) -> str:
    return (
        f"the request body is above {settings.max_request_bytes:,} bytes: at most "
        f"{settings.max_upload_bytes:,} bytes per image and "
        f"{settings.max_images_per_request} images per request"
    )


async def _refuse(
    status: int, message: str, scope: Scope, receive: Receive, send: Send, extra=None
) -> None:
    headers = {"Connection": "close", **(extra or {})}  # the unread body is not a request
    response = error_response(context_of(scope).operation, status, message, headers)
    await response(scope, receive, send)


def _seconds(value: bytes) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 and math.isfinite(seconds) else None
