"""Admission at the door: the expected wait is measured, and a request that would wait
too long is refused before its body is read, on a connection that stays usable."""

import asyncio
import socket
import time

import pytest

from bench.load import multipart_body
from service.admission import Admission
from tests.service_helpers import encode, live_server, serve


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
        door.enter()
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
    for _ in range(100):
        assert off.admit() is None
        off.enter()


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


def test_the_door_refuses_before_reading_the_body(monkeypatch, models_dir):
    """With requests ahead whose expected wait is above the bound, a new inference request
    is answered 503 + Retry-After without its body ever being asked for, and without
    closing its connection; other routes are not affected."""
    with serve(monkeypatch, models_dir, max_queue_delay_ms="50") as client:
        door = client.app.state.plane.admission
        door.images_per_second, door.in_system = 100.0, 6  # 60 ms ahead
        sent: list[dict] = []

        async def no_body() -> dict:
            raise AssertionError("the body was read")

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v2/models/x/infer",
                 "headers": [], "query_string": b"", "state": {}}  # fmt: skip
        asyncio.run(client.app(scope, no_body, send))
        start = sent[0]
        headers = dict(start["headers"])
        assert start["status"] == 503 and headers[b"retry-after"] == b"1"
        assert b"connection" not in headers  # kept alive
        assert b"MAX_QUEUE_DELAY_MS" in sent[1]["body"]
        assert client.get("/health/ready").status_code == 200
        door.in_system = 0


def test_slow_uploads_do_not_count_as_waiting_for_the_model(models_dir, images):
    """Requests still sending their bodies wait for their clients, not for the model: a
    dozen stalled uploads must not make the door refuse a request that arrives whole
    (counting them from the door did, in the faults benchmark's slow-clients row)."""
    body, content_type = multipart_body(encode(images[0]), "a.png")
    with live_server(models_dir, max_queue_delay_ms="1") as port:
        warm = socket.create_connection(("127.0.0.1", port), timeout=30)
        started = time.monotonic()
        while time.monotonic() - started < 3:  # the door measures the model's rate
            warm.sendall(head(content_type, len(body)) + body)
            assert _read_response(warm)[0] == 200
        stalled = [_send_head(port, content_type, len(body)) for _ in range(12)]
        time.sleep(0.3)  # their requests have passed the door and wait for their bodies
        for _ in range(5):
            warm.sendall(head(content_type, len(body)) + body)
            assert _read_response(warm)[0] == 200
        for sock in stalled:
            sock.sendall(body)
            assert _read_response(sock)[0] == 200
            sock.close()
        warm.close()
