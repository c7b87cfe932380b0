"""Per-request bounds over HTTP (applied by service/http/middleware.py, no per-request
task, no body copy).

- A deadline for every request: REQUEST_TIMEOUT_SECONDS, shortened by an
  `X-Request-Timeout` header (seconds). The inference path drops work past it (504).
- A bound on the body that fits its protocol: for the Open Inference Protocol, the
  largest valid inference request (service/codec.py): in JSON, every value of
  MAX_IMAGES_PER_REQUEST images spelt out; with binary data (an
  `Inference-Header-Content-Length` header), /predict's bound for encoded images, or the
  pixels, whichever is larger; elsewhere every image at its upload limit. Refused from
  the Content-Length header or, without one, as soon as the stream crosses it (413).
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

import math

from service.codec import HEADER_LENGTH, max_binary_request_bytes, max_request_bytes
from service.config import Settings

TIMEOUT_HEADER = b"x-request-timeout"
BINARY_HEADER = HEADER_LENGTH.lower().encode()  # as ASGI gives header names
BAD_TIMEOUT = "X-Request-Timeout must be a positive number of seconds"


class Limits:
    """The bounds, worded once from the settings, and the bytes of bodies under way in
    this worker (one event loop: no lock)."""

    def __init__(self, settings: Settings) -> None:
        self.max_body = settings.max_request_bytes
        images = settings.max_images_per_request
        self.max_v2_body = max_request_bytes(images)
        self.max_v2_binary = max_binary_request_bytes(images, settings.max_request_bytes)
        # The 413 messages, worded once: a request only picks one.
        self.too_large = body_too_large(settings)
        self.too_large_v2 = (
            f"the request body is above {self.max_v2_body:,} bytes, the largest valid "
            f"JSON inference request of {images} images (encoded images above that: send "
            f"them as binary data, {HEADER_LENGTH})"
        )
        self.too_large_v2_binary = (
            f"the request body is above {self.max_v2_binary:,} bytes, the largest valid "
            f"inference request of {images} images with binary data"
        )
        self.request_timeout = settings.request_timeout_seconds
        self.body_timeout = settings.body_timeout_seconds
        self.budget = settings.max_body_bytes_in_flight
        self.in_flight = 0  # body bytes reserved by requests under way

    def busy(self) -> str:
        return (f"the server is already receiving {self.in_flight:,} bytes of request bodies "
                f"(MAX_BODY_BYTES_IN_FLIGHT {self.budget:,}); retry shortly")  # fmt: skip

    def late(self, left: float, timeout: float) -> str:
        """Why a body read timed out, `left` seconds before the request's deadline."""
        why = (
            f"no body data for {self.body_timeout:g} s"
            if left > self.body_timeout
            else f"the body did not arrive within the request's {timeout:g} s"
        )
        return f"{why}; send the whole body promptly"


def body_too_large(settings: Settings) -> str:
    return (
        f"the request body is above {settings.max_request_bytes:,} bytes: at most "
        f"{settings.max_upload_bytes:,} bytes per image and "
        f"{settings.max_images_per_request} images per request"
    )


def seconds(value: bytes) -> float | None:
    """An `X-Request-Timeout` value: a positive finite number, or None."""
    try:
        asked = float(value)
    except ValueError:
        return None
    return asked if asked > 0 and math.isfinite(asked) else None
