"""Running the app: uvicorn with the limits a public server needs, from the settings.

uvicorn bounds keep-alive and graceful shutdown itself; what it lacks is added to its
httptools protocol here, because it applies before any ASGI code runs:
- the request line and headers must arrive within HEADER_TIMEOUT_SECONDS of the
  connection opening (or of the request's first byte on a kept-alive connection): a
  client dribbling its headers is answered 408 and closed;
- they must fit in MAX_HEADER_BYTES: 431 and closed;
- the door (service/http/door.py's `Gate`, handed over in the app's lifespan state):
  an inference request it refuses is answered 503 here, as soon as its head is parsed,
  with no ASGI task, no middleware, and its body discarded as it arrives; the
  connection stays open for the next request (`python -m bench floor` measures what a
  refusal costs).
It also joins what one turn of the event loop writes to a connection into one send
(`CoalescedTransport`): a response's head and body, which uvicorn writes apart.

With several workers each listens on its own socket, all bound to one address with
SO_REUSEPORT, so the kernel spreads new connections over the workers one by one. With
one socket shared by all (uvicorn's way), the worker whose event loop wakes first
accepts every connection waiting: a client opening 4 or 8 keep-alive connections at once
often had all of them on one worker, which then did all the work while the other idled
(measured with `python -m bench`'s many-image rows: about half the images per second).

`drain_on_sigterm` gives SIGTERM the shape orchestrators expect: readiness turns 503 at
once while the server keeps serving for SHUTDOWN_DRAIN_SECONDS (so load balancers stop
sending), then uvicorn stops accepting and gives in-flight requests
GRACEFUL_SHUTDOWN_SECONDS to finish.
"""

import asyncio
import json
import logging
import signal
import socket
import threading
import time
from typing import Any

import httptools
import uvicorn
from starlette.types import Message
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import Process

from service.config import Settings
from service.http.door import ADMITTED, ARRIVED, GATE, Gate

log = logging.getLogger(__name__)
REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}  # fmt: skip


_GUARDED = threading.Event()  # set in a process whose app was loaded by a ServerConfig


class ServerConfig(uvicorn.Config):
    """uvicorn's config plus our header limits (a module-level class: it is pickled to
    worker processes)."""

    def __init__(self, app: Any, *, max_header_bytes: int, header_timeout: float, **kw) -> None:
        super().__init__(app, **kw)
        self.max_header_bytes = max_header_bytes
        self.header_timeout = header_timeout

    def load(self) -> None:
        _GUARDED.set()  # each worker loads the app through its own copy of this config
        super().load()


def guarded() -> bool:
    """Whether this process's server was configured here (so the limits are in force)."""
    return _GUARDED.is_set()


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescedTransport(transport, self.loop))  # type: ignore[arg-type]
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes seen, for a blank line split across chunks
        self._head_timer: asyncio.TimerHandle | None = None
        self._start_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arrived = time.monotonic()  # for admission: how long it waited for the loop
        if self._head_timer is None:  # a new request on a kept-alive connection
            self._head_bytes, self._head_tail = 0, b""
            self._start_head_timer()

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        gate: Gate | None = self.app_state.get(GATE)
        asked = gate is not None and self._answers_next() and self.parser.get_method() == b"POST"
        if asked:
            path = httptools.parse_url(self.url).path.decode("ascii", "replace")
            if (refused := gate.refuse("POST", path, self._arrived)) is not None:
                self._answer(*refused)
                return
        super().on_headers_complete()  # builds the scope; its task has not started yet
        state = self.scope["state"]
        state[ARRIVED] = self._arrived
        if asked:
            state[ADMITTED] = True

    def _answers_next(self) -> bool:
        """Whether this request's answer goes out next: not pipelined behind one still
        being answered (its answer must wait its turn, so the ASGI path takes it), and
        not an upgrade."""
        previous = self.cycle
        return (previous is None or previous.response_complete) and not self.parser.should_upgrade()

    def _answer(self, start: Message, body: Message) -> None:
        """Answer the request whose head was just parsed, here: the rest of its body is
        discarded as it arrives (uvicorn drops a body once its response is complete) and
        the connection is kept for the next request, unless either side says close."""
        headers = [*self.server_state.default_headers, *start["headers"]]
        close = (b"connection", b"close") in headers or not self.parser.should_keep_alive()
        if close and (b"connection", b"close") not in headers:
            headers.append((b"connection", b"close"))
        self._write(start["status"], headers, body["body"])
        self.cycle = _Answered()  # type: ignore[assignment]
        if close:
            self.transport.close()
        self.on_response_complete()  # counts it; arms keep-alive or starts a pipelined one

    def data_received(self, data: bytes) -> None:
        # While a head is under way, count the part of this chunk up to the blank line that
        # ends it (the chunk that completes a head counts too), before the parser sees it.
        if self._head_timer is not None and not self.transport.is_closing():
            seen = self._head_tail + data
            end = seen.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
            self._head_tail = seen[-3:]
            if self._head_bytes > self.config.max_header_bytes:
                self._refuse(
                    431, f"the request head is above {self.config.max_header_bytes:,} bytes"
                )
                return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.config.header_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            seconds = f"{self.config.header_timeout:g}"
            self._refuse(408, f"the request head did not arrive within {seconds} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer a broken head before the app is involved (like uvicorn's own 400), then
        close."""
        self._stop_head_timer()
        body = json.dumps({"detail": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        self._write(status, headers, body)
        self.transport.close()

    def _write(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS[status]}\r\n".encode()]
        lines += [name + b": " + value + b"\r\n" for name, value in headers]
        self.transport.write(b"".join(lines) + b"\r\n" + body)


class CoalescedTransport:
    """A connection's transport whose writes in one turn of the event loop leave in one
    send. uvicorn writes a response's head and its body apart: two system calls, and two
    segments for the client to read, for every answer (`python -m bench floor`: one
    send instead of two took the /v2 route's server CPU per request down by about a
    tenth and its requests per second up by a third). Large writes go at once, so a
    response streamed in big pieces still meets the transport's flow control."""

    __slots__ = ("_loop", "_pending", "_size", "_transport")
    AT_ONCE = 64 * 1024  # bytes held back at most

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)
        self._size += len(data)
        if self._size >= self.AT_ONCE:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            if not self._transport.is_closing():  # the client left: nothing to send it
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


class _Answered:
    """The request cycle of a request the protocol answered itself: what uvicorn's
    protocol reads of a finished cycle (a later body chunk is dropped, a lost connection
    wakes nobody)."""

    response_complete = True
    disconnected = False
    keep_alive = False

    def __init__(self) -> None:
        self.message_event = asyncio.Event()


def drain_on_sigterm(draining: threading.Event, seconds: float) -> None:
    """On SIGTERM: set `draining` now, hand the signal to uvicorn `seconds` later.

    Called from the app's lifespan, inside uvicorn's own signal handling (which restores
    its handlers on exit). A second SIGTERM stops at once."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        return  # not under a server (tests drive the app in a thread), or no drain wanted
    stop = signal.getsignal(signal.SIGTERM)
    if not callable(stop):
        return

    def handle(sig: int, frame: Any) -> None:
        if draining.is_set():
            stop(sig, frame)
            return
        draining.set()
        log.info("SIGTERM: draining, readiness is 503", extra={"drain_seconds": seconds})
        timer = threading.Timer(seconds, stop, (sig, frame))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, handle)


def server_config(settings: Settings, app: Any = "service.main:app", **overrides) -> ServerConfig:
    """The one uvicorn configuration, from the settings: every way this project starts a
    server (`python -m service`, the tests, the benchmark) goes through here, so none
    runs without the head limits, keep-alive and shutdown bounds. `overrides` are for
    where it listens and how much it logs."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "http": GuardedHttpToolsProtocol,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "timeout_graceful_shutdown": settings.graceful_shutdown_seconds,
        "log_level": settings.log_level.lower(),
        "log_config": None,  # the app configures logging: one JSON formatter for every line
        "access_log": False,  # the app writes one access line per request, with its id
        # No client address is used (logs, keys and limits never read one): uvicorn's
        # X-Forwarded-For layer would only cost every request a call per message.
        "proxy_headers": False,
        "factory": isinstance(app, str),
        **overrides,
    }
    return ServerConfig(
        app,
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout_seconds,
        **options,
    )


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets listening on one address, SO_REUSEPORT set on each (port 0: the
    first one's port, whichever the kernel picked)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, sockets[0].getsockname()[1] if sockets else port))
        sockets.append(sock)
    return sockets


class SpreadWorkers(Multiprocess):
    """uvicorn's supervisor, but each worker started with its own socket of the
    SO_REUSEPORT group (a worker restarted after dying listens on all of them: none is
    left without a listener)."""

    def init_processes(self) -> None:
        for sock in self.sockets:
            process = Process(self.config, [sock])
            process.start()
            self.processes.append(process)


def serve(settings: Settings) -> None:
    """`python -m service`: serve MODELS_DIR with every limit taken from the settings."""
    config = server_config(settings)
    if config.workers > 1:
        try:
            sockets = listening_sockets(config.host, config.port, config.workers)
        except OSError as error:  # the address is taken, or the host is not ours
            raise SystemExit(f"cannot listen on {config.host}:{config.port}: {error}") from None
        log.info("listening", extra={"host": config.host, "port": config.port,
                                     "workers": config.workers})  # fmt: skip
        SpreadWorkers(config, sockets=sockets).run()
    else:
        uvicorn.Server(config).run()
