"""Admission at the door: the expected wait is measured, and a request that would wait
too long is refused before its body is read, on a connection that stays usable."""

import socket
import time

import pytest

from bench.load import multipart_body
from service.admission import Admission
from tests.service_helpers import encode, live_server


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_is_measured_from_the_batches_run():
    door = Admission(max_delay=0.05)
    for _ in range(3):
        door.batch_ran(32, 0.06)
    assert door.images_per_second == 0  # not a whole window of compute yet (0.18 s)
    door.batch_ran(32, 0.06)
    assert door.images_per_second == pytest.approx(128 / 0.24)
    for _ in range(3):
        door.batch_ran(8, 0.07)  # a slower window: smoothed, not taken whole
    assert door.images_per_second == pytest.approx(0.3 * 24 / 0.21 + 0.7 * 128 / 0.24)


def test_refuses_when_the_expected_wait_is_above_the_bound():
    clock = Clock()
    door = Admission(max_delay=0.05, clock=clock)
    door.images_per_second = 100.0  # 10 ms per request ahead
    for _ in range(6):  # 0, 1, ... 5 ahead: waits up to 50 ms, at the bound: admitted
        assert door.admit() is None
    assert door.admit() == pytest.approx(0.06)  # 6 ahead: 60 ms, refused
    # Time already spent waiting for the event loop counts too.
    door.leave()
    assert door.admit(arrived=clock.now - 0.02) == pytest.approx(0.07)
    assert door.in_system == 5


def test_an_empty_worker_admits_and_zero_turns_it_off():
    clock = Clock()
    door = Admission(max_delay=0.001, clock=clock)
    door.images_per_second = 0.1
    assert door.admit(arrived=clock.now - 5) is None  # alone: never refused
    off = Admission(max_delay=0, clock=clock)
    off.images_per_second = 0.1
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
    expected wait (one request ahead at the measured images per second) is above a 1 ms
    bound, gets 503 + Retry-After while its own body is still unsent, and the same
    connection then carries a request that is answered."""
    body, content_type = multipart_body(encode(images[0]), "a.png")
    with live_server(models_dir, max_queue_delay_ms="1") as port:
        warm = socket.create_connection(("127.0.0.1", port), timeout=30)
        # Enough sequential requests for the door to measure the model's rate.
        started = time.monotonic()
        while time.monotonic() - started < 3:
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
