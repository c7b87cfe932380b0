"""The admission door held closed on a real server, with nothing timed.

The door (service/admission.py) only refuses while another inference request of the
worker is in the system (body in, not yet answered). So one is kept there: on a
connection whose client reads nothing (a small receive buffer), a first request gets an
answer larger than every buffer on the way (the server's socket at its largest, the
client's, uvicorn's transport), so the transport stays paused; a second inference request
pipelined behind it is answered by the model and then waits to send its answer until
the client reads. With MAX_QUEUE_DELAY_MS at 100 ns (any request has waited longer than
that since its first byte was parsed), the door is closed until that connection is read,
and open again after. Used by tests/test_door.py and `python -m bench floor` (the cost
of a refusal).
"""

import contextlib
import http.client
import json
import math
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.load import pixel_images, v2_body
from bench.servers import HOST
from service.codec import HEADER_LENGTH

MAX_IMAGES = 16384
CLASSIFIED = re.compile(r"^images_classified_total\{[^}]*\} (\S+)$", re.M)
WIDE = ["probabilities", "features"]  # the largest answer per image


def closed_settings(model: str) -> dict[str, object]:
    """Service settings under which `held_closed` closes the door."""
    return {
        "default_model": model,
        "max_queue_delay_ms": 0.0001,  # 100 ns: closed whenever another request is in
        "max_images_per_request": MAX_IMAGES,
        "max_queue_images": MAX_IMAGES,
        "batch_max_size": 256,
    }


def raw_request(path: str, body: bytes, headers: dict[str, str], close: bool = False,
                method: str = "POST") -> bytes:  # fmt: skip
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head += "Connection: close\r\n" if close else ""
    return (head + "\r\n").encode() + body


def v2_request(path: str, images: np.ndarray, outputs: list[str], close: bool = False) -> bytes:
    """Binary tensor data in, the named outputs back in JSON."""
    body, head = v2_body(images)
    header = json.loads(body[:head])  # the bench's request, asking for other outputs
    header["outputs"] = [{"name": name} for name in outputs]
    prefix = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(prefix))}
    return raw_request(path, prefix + body[head:], headers, close)


class Connection:
    """A raw keep-alive connection: requests written as bytes, responses read in order
    (buffered: a response may arrive in the same packet as the one before it)."""

    def __init__(self, port: int, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:  # before connecting, so the window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(120)  # a bound on waiting, not a measurement
        self.sock.connect((HOST, port))
        self.reader = self.sock.makefile("rb")

    def send(self, request: bytes) -> None:
        self.sock.sendall(request)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response (with a Content-Length): status, lower-cased headers, body."""
        status_line = self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response")
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
    """The server's /metrics text."""
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return text


def classified(text: str) -> float:
    return sum(float(value) for value in CLASSIFIED.findall(text))


def response_bytes_per_image(port: int, infer: str) -> float:
    """Bytes of a JSON answer with the wide outputs, per image (one image repeated)."""
    sizes = []
    connection = Connection(port)
    for count in (1, 9):
        connection.send(v2_request(infer, np.repeat(pixel_images(1), count, 0), WIDE))
        status, _, body = connection.response()
        if status != 200:
            raise RuntimeError(f"{infer} answered {status}: {body[:200]!r}")
        sizes.append(len(body))
    connection.close()
    return (sizes[1] - sizes[0]) / 8


def unread_bytes_bound() -> int:
    """What the kernel and uvicorn may hold of a response nobody reads: the server
    socket's send buffer at its largest (tcp_wmem's maximum), the client's receive buffer
    (set small) and the transport's high-water mark (64 KiB), with room to spare."""
    try:
        largest_send_buffer = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        largest_send_buffer = 16 << 20
    return largest_send_buffer + (4 << 20)


@contextlib.contextmanager
def held_closed(port: int, model: str) -> Iterator[None]:
    """Yields while one inference request is in the system and cannot leave it (a server
    started with `closed_settings(model)`). On exit the held connection is read to its
    end, both answers checked: the request leaves, and the door opens."""
    infer = f"/v2/models/{model}/infer"
    count = math.ceil(2 * unread_bytes_bound() / response_bytes_per_image(port, infer))
    if count > MAX_IMAGES:
        raise RuntimeError(f"{count} images needed for a large enough answer")
    before = classified(scrape(port))
    held = Connection(port, receive_buffer=4096)
    large = v2_request(infer, np.repeat(pixel_images(1), count, 0), WIDE)
    one = v2_request(infer, pixel_images(1, seed=1), ["probabilities"])
    held.send(large + one)  # pipelined: the second starts once the first is written
    deadline = time.monotonic() + 120  # a bound on waiting, not a measurement
    while classified(scrape(port)) < before + count + 1:  # both computed: the second is in
        if time.monotonic() > deadline:
            raise RuntimeError("the held requests were never computed")
        time.sleep(0.05)
    try:
        yield
    finally:
        status, _, body = held.response()
        if status != 200 or len(body) <= unread_bytes_bound():
            raise RuntimeError(f"the large answer: {status}, {len(body)} bytes")
        status, _, body = held.response()
        if status != 200 or json.loads(body)["outputs"][0]["shape"] != [1, 100]:
            raise RuntimeError(f"the held answer: {status}, {body[:200]!r}")
        held.close()
