"""The admission door of a real `python -m service` over real sockets.

The door closes when a request would wait longer than MAX_QUEUE_DELAY_MS, and it only
ever refuses while another inference request of the worker is in the system (body in,
not yet answered). So the tests hold one in the system for as long as they like, with
nothing timed: on a connection whose client reads nothing (a small receive buffer), a
first request gets a response larger than every buffer on the way (the server's socket
at its largest, the client's, uvicorn's transport), so the transport stays paused; a
second inference request pipelined behind it is answered by the model, and then waits
to send its answer until the client reads. With MAX_QUEUE_DELAY_MS at 100 ns (any
request has waited longer than that since its first byte was parsed), the door is
closed until the test reads that connection, and open again after.
"""

import contextlib
import http.client
import json
import math
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.load import multipart_body, pixel_images, png_bytes, v2_body
from bench.servers import HOST, service_process
from service.codec import HEADER_LENGTH

MODEL = "cifar100-5735844"  # the wider features: fewer images make a large response
MAX_IMAGES = 16384
SETTINGS = {
    "default_model": MODEL,
    "max_queue_delay_ms": 0.0001,  # 100 ns: closed whenever another request is in
    "max_images_per_request": MAX_IMAGES,
    "max_queue_images": MAX_IMAGES,
    "batch_max_size": 256,
}
DOOR_COUNTER = re.compile(r'^requests_shed_at_door_total\{route="([^"]+)"\} (\S+)$', re.M)
CLASSIFIED = re.compile(r"^images_classified_total\{[^}]*\} (\S+)$", re.M)
INFER = f"/v2/models/{MODEL}/infer"


# --- HTTP over a raw socket -------------------------------------------------------------


def v2_request(path: str, images: np.ndarray, outputs: list[str], close: bool = False) -> bytes:
    body, head = v2_body(images)
    header = json.loads(body[:head])  # the bench's request, asking for other outputs in JSON
    header["outputs"] = [{"name": name} for name in outputs]
    prefix = json.dumps(header).encode()
    body = prefix + body[head:]
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(prefix))}
    return raw_request(path, body, headers, close)


def raw_request(path: str, body: bytes, headers: dict[str, str], close: bool = False,
                method: str = "POST") -> bytes:  # fmt: skip
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += "Connection: close\r\n" if close else ""
    return (head + "\r\n").encode() + body


class Connection:
    """A raw keep-alive connection: requests written as bytes, responses read in order
    (buffered: a response may arrive in the same packet as the one before it)."""

    def __init__(self, port: int, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:  # before connecting, so the window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(120)  # a bound on the test, not a timing assertion
        self.sock.connect((HOST, port))
        self.reader = self.sock.makefile("rb")

    def send(self, request: bytes) -> None:
        self.sock.sendall(request)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response (with a Content-Length): status, lower-cased headers, body."""
        status_line = self.reader.readline()
        assert status_line, "connection closed before a response"
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.reader.read(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, body

    def closed_by_server(self) -> bool:
        """True once the server has closed its side, with nothing more sent."""
        try:
            return self.reader.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def scrape(port: int) -> str:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return text


def refused_at_door(text: str) -> dict[str, float]:
    return {route: float(value) for route, value in DOOR_COUNTER.findall(text)}


def classified(text: str) -> float:
    return sum(float(value) for value in CLASSIFIED.findall(text))


# --- holding the door closed ------------------------------------------------------------


def response_bytes_per_image(port: int) -> float:
    """Bytes of a JSON answer with every output, per image, for the same image repeated."""
    image = pixel_images(1)
    sizes = []
    connection = Connection(port)
    for count in (1, 9):
        connection.send(v2_request(INFER, np.repeat(image, count, 0), ["probabilities",
                                                                       "features"]))  # fmt: skip
        status, _, body = connection.response()
        assert status == 200, body[:200]
        sizes.append(len(body))
    connection.close()
    return (sizes[1] - sizes[0]) / 8


def unread_bytes_bound() -> int:
    """What the kernel and uvicorn may hold of a response nobody reads: the server
    socket's send buffer at its largest (tcp_wmem's maximum), the client's receive buffer
    (set small below) and the transport's high-water mark (64 KiB), with room to spare."""
    try:
        largest_send_buffer = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        largest_send_buffer = 16 << 20
    return largest_send_buffer + (4 << 20)


@contextlib.contextmanager
def door_held_closed(port: int) -> Iterator[None]:
    """Yields while one inference request is in the system and cannot leave it: its
    answer waits behind an unread one on a connection nobody reads. On exit that
    connection is read to its end (both answers 200): the request leaves."""
    per_image = response_bytes_per_image(port)
    count = math.ceil(2 * unread_bytes_bound() / per_image)
    assert count <= MAX_IMAGES, f"{count} images needed for a large enough answer"
    before = classified(scrape(port))
    held = Connection(port, receive_buffer=4096)
    large = v2_request(INFER, np.repeat(pixel_images(1), count, 0), ["probabilities", "features"])
    one = v2_request(INFER, pixel_images(1, seed=1), ["probabilities"])
    held.send(large + one)  # pipelined: the second starts once the first is written
    deadline = time.monotonic() + 120  # a bound on the test, not a timing assertion
    while classified(scrape(port)) < before + count + 1:  # both computed: the second is in
        assert time.monotonic() < deadline, "the held requests were never computed"
        time.sleep(0.05)
    try:
        yield
    finally:
        status, _, body = held.response()
        assert status == 200 and len(body) > unread_bytes_bound()
        status, _, body = held.response()
        assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1, 100]
        held.close()


@pytest.fixture(scope="module")
def server(models_dir) -> Iterator[int]:
    with service_process(models_dir=models_dir, **SETTINGS) as (port, _):
        yield port


def inference_requests() -> dict[str, tuple[str, bytes]]:
    """One request for each inference route: (the door's label for it, the request)."""
    png = png_bytes(pixel_images(1)[0])
    predict, predict_type = multipart_body(png, "a.png")
    explain, explain_type = multipart_body(png, "a.png", field="file")
    image = pixel_images(1)
    return {
        "predict": ("/predict", raw_request("/predict", predict, {"Content-Type": predict_type})),
        "explain": ("/explain", raw_request("/explain", explain, {"Content-Type": explain_type})),
        "v2 infer": (INFER.replace(MODEL, "{model_name}"),
                     v2_request(INFER, image, ["probabilities"])),
        "v2 versioned infer": (INFER.replace(MODEL, "{model_name}"), v2_request(
            f"/v2/models/{MODEL}/versions/{{version}}/infer", image, ["probabilities"])),
        "v2 explain": ("/v2/models/{model_name}/explain",
                       v2_request(f"/v2/models/{MODEL}/explain", image, ["heat_map"])),
    }  # fmt: skip


# --- the tests ----------------------------------------------------------------------------


def test_every_inference_route_is_refused_at_the_closed_door_on_a_kept_alive_connection(
    server,
):
    """While the door is closed, each inference route is answered 503 + Retry-After in its
    API's error shape, without its body being needed and without closing the connection:
    the next request on the same connection (another route, then, once the door opens,
    inference) is answered. The refusal counter rises by exactly the refusals seen."""
    port = server
    version = json.loads(
        urllib_get(port, f"/v2/models/{MODEL}"))["versions"][0]  # fmt: skip
    before = refused_at_door(scrape(port))
    seen: dict[str, int] = {}
    with door_held_closed(port):
        connection = Connection(port)  # opened now: an idle new connection meets HEADER_TIMEOUT
        for what, (label, request) in inference_requests().items():
            connection.send(request.replace(b"{version}", version.encode()))
            status, headers, body = connection.response()
            assert status == 503, (what, status, body[:200])
            assert headers["retry-after"] == "1", what
            assert "connection" not in headers, what  # kept alive
            key = "error" if label.startswith("/v2") else "detail"
            assert "MAX_QUEUE_DELAY_MS" in json.loads(body)[key], what
            seen[label] = seen.get(label, 0) + 1
        # The same connection, a route the door does not hold: answered at once.
        connection.send(raw_request("/models", b"", {}, method="GET"))
        status, _, body = connection.response()
        assert status == 200 and MODEL in body.decode()
        # Only the door refused: no request counted as answered 503 by the model.
        assert refused_at_door(scrape(port)) == {
            label: before.get(label, 0) + seen.get(label, 0) for label in before
        }
    # The held request has left: the door opens, and the same connection is answered.
    _, request = inference_requests()["v2 infer"]
    connection.send(request)
    status, _, body = connection.response()
    assert status == 200, body[:200]
    connection.close()
    assert seen == {"/predict": 1, "/explain": 1, "/v2/models/{model_name}/infer": 2,
                    "/v2/models/{model_name}/explain": 1}  # fmt: skip


def test_the_counter_rises_by_exactly_the_refusals_clients_saw(server):
    """Many clients, each on its own keep-alive connection (http.client), while the door
    is closed: every inference request refused, every other request answered, and the
    door's counter rises by the number of 503s they saw, route by route."""
    port = server
    before = refused_at_door(scrape(port))
    png = png_bytes(pixel_images(1)[0])
    form, form_type = multipart_body(png, "a.png")
    clients = [http.client.HTTPConnection(HOST, port, timeout=60) for _ in range(8)]
    statuses: list[int] = []
    with door_held_closed(port):
        for round_ in range(3):
            for client in clients:
                client.request("POST", "/predict", form, {"Content-Type": form_type})
                response = client.getresponse()
                response.read()
                assert response.getheader("Retry-After") == "1"
                statuses.append(response.status)
                if round_ == 1:  # a request the door does not hold, on the same connection
                    client.request("GET", "/health/ready")
                    ready = client.getresponse()
                    ready.read()
                    assert ready.status == 200
    for client in clients:
        client.close()
    assert statuses == [503] * 24
    after = refused_at_door(scrape(port))
    assert after["/predict"] - before.get("/predict", 0) == 24
    assert {k: v for k, v in after.items() if k != "/predict"} == {
        k: v for k, v in before.items() if k != "/predict"
    }


def test_under_a_real_overload_the_door_refuses_some_and_answers_others(server):
    """64 closed-loop clients of 8 images through /v2 (the bench's load generator, which
    waits as Retry-After says): live batches measure the rate, requests queue, and the
    door refuses some of them; every refusal carries Retry-After and is counted."""
    port = server
    before = refused_at_door(scrape(port))
    load = subprocess.run(
        [sys.executable, "-m", "bench.load", "--port", str(port), "--kind", "v2",
         "--path", INFER, "--images", "8", "--concurrency", "64", "--duration", "3",
         "--requests", "3000"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    stats = json.loads(load.stdout)
    assert stats["shed"] > 0 and stats["requests"] > 0, stats
    assert stats["shed_without_retry_after"] == 0 and stats["errors"] == 0, stats
    after = refused_at_door(scrape(port))
    label = "/v2/models/{model_name}/infer"
    assert after[label] - before.get(label, 0) == stats["shed"]


def test_while_draining_refusals_and_answers_say_connection_close(models_dir):
    """After SIGTERM the server drains: a refusal at the door, like every other answer,
    says `Connection: close` and the server closes the connection after it; once the door
    opens, an answered inference request says the same."""
    settings = {**SETTINGS, "shutdown_drain_seconds": 120, "graceful_shutdown_seconds": 5}
    with service_process(models_dir=models_dir, **settings) as (port, process):
        with door_held_closed(port):
            process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60  # a bound on the test, not a timing assertion
            while urllib_status(port, "/health/ready") != 503:  # the signal has landed
                assert time.monotonic() < deadline, "readiness never turned 503"
                time.sleep(0.05)
            _, request = inference_requests()["predict"]
            connection = Connection(port)
            connection.send(request)
            status, headers, _ = connection.response()
            assert status == 503 and headers["retry-after"] == "1"
            assert headers["connection"] == "close"
            assert connection.closed_by_server()
            connection = Connection(port)
            connection.send(raw_request("/models", b"", {}, method="GET"))
            status, headers, _ = connection.response()
            assert status == 200 and headers["connection"] == "close"
            assert connection.closed_by_server()
        connection = Connection(port)
        connection.send(request)
        status, headers, body = connection.response()
        assert status == 200, body[:200]
        assert headers["connection"] == "close"
        assert connection.closed_by_server()


def urllib_get(port: int, path: str) -> bytes:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    connection.request("GET", path)
    body = connection.getresponse().read()
    connection.close()
    return body


def urllib_status(port: int, path: str) -> int:
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status
