"""Admission at the door: the expected wait is measured, and a request that would wait
too long is refused before its body is read, on a connection that stays usable."""

import socket
import time

import pytest

from bench.load import multipart_body
from service.admission import WINDOW_SECONDS, Admission
from tests.service_helpers import encode, live_server


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_seconds_per_request_is_busy_time_over_completions():
    clock = Clock()
    door = Admission(max_delay=0, clock=clock)  # measuring only
    # Four requests in the system throughout, one answered every 30 ms: the first window
    # closes at the 7th (0.21 s busy / 7).
    for _ in range(4):
        assert door.admit() is None
    for _ in range(10):
        clock.now += 0.03
        door.leave()
        assert door.admit() is None
    assert door.seconds_per_request == pytest.approx(0.03)
    # Idle time does not count: the window so far (0.09 s busy, 3 answered) takes the
    # four answered at once, then a minute idle, then one request of 0.2 s: 0.29 s / 8.
    for _ in range(4):
        door.leave()
    clock.now += 60
    assert door.admit() is None
    clock.now += WINDOW_SECONDS
    door.leave()
    assert door.seconds_per_request == pytest.approx(0.3 * (0.29 / 8) + 0.7 * 0.03)


def test_refuses_when_the_expected_wait_is_above_the_bound():
    clock = Clock()
    door = Admission(max_delay=0.05, clock=clock)
    door.seconds_per_request = 0.01
    for _ in range(5):  # 0, 1, ... 4 ahead: waits up to 40 ms
        assert door.admit() is None
    assert door.admit() is None  # 5 ahead x 10 ms = 50 ms: at the bound, admitted
    assert door.admit() == pytest.approx(0.06)  # 6 ahead: 60 ms, refused
    # Time already spent waiting for the event loop counts too.
    door.leave()
    assert door.admit(arrived=clock.now - 0.02) == pytest.approx(0.07)
    assert door.in_system == 5


def test_an_empty_worker_admits_and_zero_turns_it_off():
    clock = Clock()
    door = Admission(max_delay=0.001, clock=clock)
    door.seconds_per_request = 10.0
    assert door.admit(arrived=clock.now - 5) is None  # alone: never refused
    off = Admission(max_delay=0, clock=clock)
    off.seconds_per_request = 10.0
    assert all(off.admit() is None for _ in range(100))


def head(content_type: str, length: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _send_head(port: int, content_type: str, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head(content_type, length))
    return sock


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))  # fmt: skip
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1]), head + b"\r\n\r\n" + rest


def test_the_door_refuses_before_the_body_and_keeps_the_connection(models_dir, images):
    """A request admitted and still sending its body holds a place; the next one, whose
    expected wait (one request ahead at the measured seconds per request) is above a 1 ms
    bound, gets 503 + Retry-After while its own body is still unsent, and the same
    connection then carries a request that is answered."""
    body, content_type = multipart_body(encode(images[0]), "a.png")
    with live_server(models_dir, max_queue_delay_ms="1") as port:
        warm = socket.create_connection(("127.0.0.1", port), timeout=30)
        # Enough sequential requests to measure the service rate (one busy window).
        started = time.monotonic()
        while time.monotonic() - started < 3 * WINDOW_SECONDS:
            warm.sendall(head(content_type, len(body)) + body)
            assert _read_response(warm)[0] == 200
        holder = _send_head(port, content_type, len(body))  # admitted, its body pending
        time.sleep(0.2)  # its task has run the door (nothing to observe it by from outside)
        late = _send_head(port, content_type, len(body))
        status, response = _read_response(late)  # its body was never sent
        assert status == 503, response
        assert b"retry-after: 1" in response.lower() and b"MAX_QUEUE_DELAY_MS" in response
        holder.sendall(body)
        assert _read_response(holder)[0] == 200
        # The refused request's body, then a real request, on the same connection.
        late.sendall(body + head(content_type, len(body)) + body)
        assert _read_response(late)[0] == 200
        for sock in (warm, holder, late):
            sock.close()
