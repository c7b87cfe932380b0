"""Per-request bounds, as one pure ASGI middleware (no per-request task, no body copy).

- A deadline for every request: REQUEST_TIMEOUT_SECONDS, shortened by an
  `X-Request-Timeout` header (seconds). The inference path drops work past it (504).
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
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.errors import Overloaded
from service.images import release_memory

TIMEOUT_HEADER = b"x-request-timeout"
T = TypeVar("T")


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, draining: threading.Event) -> None:
        self.app = app
        self.request_timeout = settings.request_timeout_seconds
        self.body_timeout = settings.body_timeout_seconds
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timeout = self.request_timeout
        for name, value in scope["headers"]:
            if name == TIMEOUT_HEADER:
                asked = _seconds(value)
                if asked is None:
                    message = "X-Request-Timeout must be a positive number of seconds"
                    key = "error" if scope["path"].startswith("/v2") else "detail"
                    return await JSONResponse({key: message}, 400)(scope, receive, send)
                timeout = min(timeout, asked)
        scope.setdefault("state", {})["deadline"] = asyncio.get_running_loop().time() + timeout

        body_done = False

        async def receive_bounded() -> Message:
            nonlocal body_done
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
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining.is_set():
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive_bounded, send_closing)


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
