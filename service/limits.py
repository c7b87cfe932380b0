"""Per-request bounds, as one pure ASGI middleware (no per-request task, no body copy).

- A deadline for every request: REQUEST_TIMEOUT_SECONDS, shortened by an
  `X-Request-Timeout` header (seconds). The inference path drops work past it (504).
- A bound on the body that fits its protocol: for /v2, the largest valid inference request
  (service/codec.py: every value of MAX_IMAGES_PER_REQUEST images spelt out in JSON);
  elsewhere every image at its upload limit. Refused from the Content-Length header or,
  without one, as soon as the stream crosses it (413).
- A bound on waiting for the body: a client that stops sending mid-body (or sends less
  than its Content-Length) gets 408 after BODY_TIMEOUT_SECONDS of silence, and the
  connection is closed.
- While the server drains for shutdown, every response says `Connection: close`, so
  keep-alive clients reconnect (elsewhere) instead of meeting a closed socket.

Header-level limits (size, time to send the headers) live in service/server.py: they
apply before a request reaches any ASGI code.
"""

import asyncio
import math
import threading
from collections.abc import Callable
from typing import TypeVar

from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.codec import max_request_bytes
from service.config import Settings
from service.errors import Overloaded, error_response
from service.images import release_memory
from service.metrics import record_of

TIMEOUT_HEADER = b"x-request-timeout"
T = TypeVar("T")


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, draining: threading.Event) -> None:
        self.app = app
        self.settings = settings
        self.max_body = settings.max_request_bytes
        self.max_v2_body = max_request_bytes(settings.max_images_per_request)
        self.request_timeout = settings.request_timeout_seconds
        self.body_timeout = settings.body_timeout_seconds
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timeout = self.request_timeout
        v2 = scope["path"].startswith("/v2/")
        max_body = self.max_v2_body if v2 else self.max_body
        too_large = (
            f"the request body is above {max_body:,} bytes, the largest valid inference "
            f"request of {self.settings.max_images_per_request} images"
            if v2
            else body_too_large(self.settings)
        )
        for name, value in scope["headers"]:
            if name == TIMEOUT_HEADER:
                asked = _seconds(value)
                if asked is None:
                    message = "X-Request-Timeout must be a positive number of seconds"
                    return await _refuse(400, message, scope, receive, send)
                timeout = min(timeout, asked)
            elif name == b"content-length" and value.isdigit() and int(value) > max_body:
                # Refused on the header alone, in the same words as while streaming.
                return await _refuse(413, too_large, scope, receive, send)
        record_of(scope).deadline = asyncio.get_running_loop().time() + timeout

        body_done, received = False, 0

        async def receive_bounded() -> Message:
            nonlocal body_done, received
            if body_done:  # later receives wait for the disconnect: no bound wanted there
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"no body data for {self.body_timeout:g} s; send the whole body promptly",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:  # refused while it streams in, never buffered
                    raise HTTPException(413, too_large, headers={"Connection": "close"})
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining.is_set():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive_bounded, send_closing)


def body_too_large(settings: Settings) -> str:
    return (
        f"the request body is above {settings.max_request_bytes:,} bytes: at most "
        f"{settings.max_upload_bytes:,} bytes per image and "
        f"{settings.max_images_per_request} images per request"
    )


async def _refuse(status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
    headers = {"Connection": "close"}  # the unread body must not be taken for a request
    await error_response(scope["path"], status, message, headers)(scope, receive, send)


def _seconds(value: bytes) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds > 0 and math.isfinite(seconds) else None


class DecodeSlots:
    """A small bound on requests decoding large images at once (each can cost a CPU for
    a while and tens of MB): beyond it, shed with 503 instead of queueing CPU work."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0

    async def run(self, decode: Callable[[], T]) -> T:
        if self.busy >= self.slots:
            raise Overloaded(
                f"{self.slots} requests are already decoding large images; retry shortly"
            )
        self.busy += 1  # the event loop is single-threaded: no lock needed
        try:
            return await run_in_threadpool(self._decode_then_trim, decode)
        finally:
            self.busy -= 1

    def _decode_then_trim(self, decode: Callable[[], T]) -> T:
        try:
            return decode()
        finally:
            if self.busy == 1:  # the last one out hands the burst's memory back
                release_memory()
