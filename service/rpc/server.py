"""The gRPC server beside HTTP: same process, same event loop, same data plane.

Started by the app's lifespan when GRPC_PORT is not 0, stopped by it: on SIGTERM the
server drains like HTTP (readiness false at once, still serving for
SHUTDOWN_DRAIN_SECONDS), then stops taking calls and gives those in flight
GRACEFUL_SHUTDOWN_SECONDS. Its bounds are REST's, in gRPC's terms:

- a message above the largest valid inference request (service/codec.py: the pixels of
  MAX_IMAGES_PER_REQUEST images, or one encoded image of MAX_UPLOAD_BYTES) is refused by
  gRPC itself (RESOURCE_EXHAUSTED) before any of our code runs;
- metadata (gRPC's headers) is bounded by MAX_HEADER_BYTES, gRPC's soft and hard limit;
- calls at once are bounded so that their messages fit MAX_BODY_BYTES_IN_FLIGHT (beyond
  it RESOURCE_EXHAUSTED at once), the counterpart of HTTP's body budget.
"""

import logging

import grpc

from service.codec import max_message_bytes
from service.config import Settings
from service.dataplane import DataPlane
from service.rpc.servicer import Servicer

log = logging.getLogger(__name__)


def options(settings: Settings) -> tuple[list[tuple[str, int]], int]:
    """The channel options and the bound on calls at once, from the settings (the bench's
    bare gRPC floor runs under the same ones)."""
    message = max_message_bytes(settings.max_images_per_request, settings.max_upload_bytes)
    return [
        ("grpc.max_receive_message_length", message),
        # gRPC refuses metadata above the hard limit, and at random between the soft
        # limit and it (by default 1.25 times the soft one): both at MAX_HEADER_BYTES.
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_header_bytes),
        # Workers share the port (the kernel spreads connections); one worker alone must
        # not share it with anything else that happens to bind it.
        ("grpc.so_reuseport", int(settings.workers > 1)),
    ], max(1, settings.max_body_bytes_in_flight // message)


async def start(plane: DataPlane, keys: frozenset[bytes]) -> tuple[grpc.aio.Server, int]:
    """A started server on HOST:GRPC_PORT, and the port it listens on."""
    settings = plane.settings
    channel_options, calls = options(settings)
    server = grpc.aio.server(options=channel_options, maximum_concurrent_rpcs=calls)
    server.add_generic_rpc_handlers([Servicer(plane, keys).handler()])
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    if not port:
        raise RuntimeError(f"gRPC could not listen on {host}:{settings.grpc_port}")
    await server.start()
    log.info("gRPC listening", extra={"grpc_port": port, "max_calls": calls})
    return server, port


async def stop(server: grpc.aio.Server, grace: float) -> None:
    """Stop taking calls; those in flight get `grace` seconds."""
    await server.stop(grace)
