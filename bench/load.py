"""Load generator: HTTP clients over loopback, closed loop or open loop.

Runs in its own process (`python -m bench.load ...`) so it does not share the server's
interpreter. Clients speak raw HTTP/1.1 over keep-alive connections with pre-built request
bytes (so the generator itself costs little CPU) and read fixed-length and chunked
responses. Five request kinds, all real-looking 32x32 images:
  png         a multipart form with one PNG (POST /predict; the peers take the same form)
  v2          the Open Inference Protocol with binary tensor data: a JSON header of
              `Inference-Header-Content-Length` bytes, then the raw uint8 pixels
  v2-bytes    the same protocol with the PNG files as its BYTES input (binary data)
  grpc        the same protocol over gRPC, raw uint8 pixels (`python -m bench.grpc_load`,
              the same options; --path names the model)
  grpc-bytes  over gRPC, the PNG files as BYTES (raw contents, 4-byte lengths)
Every kind goes through the same closed and open loops; a transport is only its client
class (`HttpClient` here, `GrpcClient` in bench/grpc_load.py) with one `send`.
Two ways to load:
  closed loop  N clients, each sends its next request when the last one is answered
  open loop    requests arrive at a fixed mean rate (Poisson), answered or not; latency
               counts from the scheduled arrival, so queueing is not hidden
Only 200s count as answered (throughput, percentiles); 503s (shed: their own
percentiles, and a count of those without Retry-After), other 4xx (refused: 413,
422...) and everything else (5xx, resets, timeouts) have their own counts. Bounded by a
request count and a duration; prints one JSON object.
"""

import argparse
import asyncio
import io
import json
import time
from types import ModuleType

import numpy as np
from PIL import Image

LINGER_SECONDS = 30.0  # open loop: how long requests still in flight may take after the run
KINDS = ("png", "v2", "v2-bytes", "grpc", "grpc-bytes")
V2_HEADER = "Inference-Header-Content-Length"


def pixel_images(count: int, seed: int = 0) -> np.ndarray:
    """Distinct 32x32 RGB images, uint8 [count, 32, 32, 3]: smooth colour fields with
    noise, like small photos."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, 32, 32, 3), dtype=np.uint8)
    for i in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
        field = coarse.repeat(8, axis=0).repeat(8, axis=1) + rng.normal(0, 12, (32, 32, 3))
        images[i] = np.clip(field, 0, 255).astype(np.uint8)
    return images


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_images(count: int, seed: int = 0) -> list[bytes]:
    """The same images as `pixel_images`, as PNG files."""
    return [png_bytes(image) for image in pixel_images(count, seed)]


def multipart_form(files: list[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    """(filename, PNG) pairs as the `field` parts of one multipart form: (body, Content-Type)."""
    boundary = "benchboundary7d93"
    parts = [
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + b"\r\n"
        for filename, image in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def multipart_body(image: bytes, filename: str, field: str = "files") -> tuple[bytes, str]:
    """One PNG as the `field` field of a multipart form: (body, Content-Type)."""
    return multipart_form([(filename, image)], field)


def http_request(
    path: str, host: str, body: bytes, headers: dict[str, str], method: str = "POST"
) -> bytes:
    """One HTTP/1.1 request's bytes; Content-Length added unless `headers` frame the body
    themselves (Content-Length or Transfer-Encoding)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    if not {"content-length", "transfer-encoding"} & {name.lower() for name in headers}:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def multipart_request(
    path: str, host: str, image: bytes, index: int, field: str = "files"
) -> bytes:
    body, content_type = multipart_body(image, f"bench{index}.png", field)
    return http_request(path, host, body, {"Content-Type": content_type})


def v2_body(images: np.ndarray) -> tuple[bytes, int]:
    """An inference request with binary tensor data: (body, length of its JSON header)."""
    header = {
        "inputs": [
            {
                "name": "images",
                "datatype": "UINT8",
                "shape": list(images.shape),
                "parameters": {"binary_data_size": images.nbytes},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + images.tobytes(), len(head)


def v2_request(path: str, host: str, images: np.ndarray) -> bytes:
    body, header_length = v2_body(images)
    headers = {"Content-Type": "application/octet-stream", V2_HEADER: str(header_length)}
    return http_request(path, host, body, headers)


def build_requests(
    kind: str, host: str, path: str, field: str = "files", images_per_request: int = 1
) -> list[bytes]:
    """64 distinct pre-built requests of `kind` (png: one image each)."""
    if kind == "png":
        return [
            multipart_request(path, host, png, i, field) for i, png in enumerate(png_images(64))
        ]
    if kind == "v2":
        pixels = pixel_images(64 + images_per_request)
        return [v2_request(path, host, pixels[i : i + images_per_request]) for i in range(64)]
    if kind == "v2-bytes":
        pngs = png_images(64 + images_per_request)
        return [files_request(path, host, pngs[i : i + images_per_request]) for i in range(64)]
    raise ValueError(f"unknown request kind {kind!r}")


def framed(files: list[bytes]) -> bytes:
    """BYTES elements as binary data: each a 4-byte little-endian length, then its bytes."""
    return b"".join(len(data).to_bytes(4, "little") + data for data in files)


def files_request(path: str, host: str, files: list[bytes]) -> bytes:
    """Encoded images as the Open Inference Protocol's BYTES input `image_files`, with
    binary tensor data (as tritonclient sends them)."""
    data = framed(files)
    tensor = {"name": "image_files", "datatype": "BYTES", "shape": [len(files)],
              "parameters": {"binary_data_size": len(data)}}  # fmt: skip
    asked = {"name": "probabilities", "parameters": {"binary_data": True}}
    header = {"inputs": [tensor], "outputs": [asked]}
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", V2_HEADER: str(len(head))}
    return http_request(path, host, head + data, headers)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response (Content-Length, chunked, or until EOF): (status, keep-alive)."""
    status, _, keep_alive = await read_response_headers(reader)
    return status, keep_alive


async def read_response_headers(
    reader: asyncio.StreamReader,
) -> tuple[int, dict[str, str], bool]:
    """Read one response (Content-Length, chunked, or until EOF): (status, its headers
    with lower-case names and values, keep-alive)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    keep_alive = headers.get("connection") != "close"
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            await reader.readexactly(size + 2)
    elif "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif status >= 200 and status not in (204, 304):
        await reader.read()  # delimited by the end of the connection
        keep_alive = False
    return status, headers, keep_alive


def retry_after(headers: dict[str, str]) -> float | None:
    """Retry-After in seconds (the delta-seconds form), or None."""
    value = headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The `q`th percentile of `seconds`, in milliseconds to 0.01; None for none."""
    if not seconds:
        return None
    return round(float(np.percentile(np.array(seconds) * 1000, q)), 2)


class Tally:
    """Outcomes of a load run: latencies of the 200s and of the 503s, and a count of
    everything else."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.shed_latencies: list[float] = []  # 503: how fast the refusals came back
        self.shed_without_retry_after = 0
        self.refused = 0  # other 4xx: 413, 422...
        self.errors = 0  # other statuses, resets, EOFs, timeouts

    @property
    def shed(self) -> int:  # 503
        return len(self.shed_latencies)

    def record(self, status: int | None, seconds: float, headers: dict | None = None) -> None:
        """One outcome; `headers` (lower-case names), where known, to check that a 503
        says when to come back."""
        if status == 200:
            self.latencies.append(seconds)
        elif status == 503:
            self.shed_latencies.append(seconds)
            if headers is not None and "retry-after" not in headers:
                self.shed_without_retry_after += 1
        elif status is not None and 400 <= status < 500:
            self.refused += 1
        else:
            self.errors += 1

    def summary(self, elapsed: float) -> dict:
        return {
            "requests": len(self.latencies),
            "seconds": round(elapsed, 3),
            "rps": round(len(self.latencies) / elapsed, 1) if elapsed > 0 else 0.0,
            "p50_ms": percentile_ms(self.latencies, 50),
            "p95_ms": percentile_ms(self.latencies, 95),
            "p99_ms": percentile_ms(self.latencies, 99),
            "shed": self.shed,
            "shed_p50_ms": percentile_ms(self.shed_latencies, 50),
            "shed_p99_ms": percentile_ms(self.shed_latencies, 99),
            "shed_without_retry_after": self.shed_without_retry_after,
            "refused": self.refused,
            "errors": self.errors,
        }


class HttpClient:
    """One keep-alive HTTP/1.1 connection, opened on first use and again after the server
    closed it: `send` writes pre-built request bytes and reads the response."""

    MULTIPLEXED = False  # one request at a time

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, request: bytes) -> tuple[int | None, dict[str, str]]:
        """(status, lower-cased headers); (None, {}) for a reset, an EOF, or not HTTP."""
        try:
            if self.connection is None:
                self.connection = await asyncio.open_connection(self.host, self.port)
            self.connection[1].write(request)
            status, headers, keep_alive = await read_response_headers(self.connection[0])
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await self.close()
            return None, {}
        if not keep_alive:
            await self.close()
        return status, headers

    async def close(self) -> None:
        if self.connection is not None:
            self.connection[1].close()
            self.connection = None


Client = type[HttpClient]  # a transport's client class: HttpClient, or bench/grpc_load.py's


async def closed_loop(
    host: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    duration: float,
    limit: int,
    wait_retry_after: bool = True,
    client: Client = HttpClient,
) -> dict:
    """`concurrency` clients (`client`: HTTP keep-alive connections, or gRPC channels),
    each with one request in flight at a time. A client told 503 with Retry-After waits
    that long (within the run) before its next request, as a well-behaved client does:
    one that retried at once would measure how fast the server refuses, not how fast it
    answers (`wait_retry_after=False`: what refusals cost)."""
    tally = Tally()
    issued = 0
    deadline = time.perf_counter() + duration

    async def one(offset: int) -> None:
        nonlocal issued
        sender = client(host, port)
        try:
            while issued < limit and time.perf_counter() < deadline:
                request = requests[(offset + issued) % len(requests)]
                issued += 1
                start = time.perf_counter()
                status, headers = await sender.send(request)
                tally.record(status, time.perf_counter() - start if status else 0.0, headers)
                if wait_retry_after and status == 503 and (after := retry_after(headers)):
                    await asyncio.sleep(max(0.0, min(after, deadline - time.perf_counter())))
        finally:
            await sender.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(concurrency)))
    return {"concurrency": concurrency, **tally.summary(time.perf_counter() - started)}


async def open_loop(
    host: str,
    port: int,
    requests: list[bytes],
    rate: float,
    duration: float,
    limit: int,
    max_connections: int = 1024,
    seed: int = 0,
    client: Client = HttpClient,
) -> dict:
    """Requests arrive at `rate` per second on average (exponential gaps), answered or
    not; latency counts from the scheduled arrival. Over HTTP each goes on an idle
    keep-alive connection or a new one (at most `max_connections`; an arrival finding
    none is counted as `unsent`, an honest overflow rather than a hidden wait); over a
    multiplexed transport (gRPC) arrivals are spread over 64 channels, none unsent."""
    tally = Tally()
    multiplexed = client.MULTIPLEXED
    pool = [client(host, port) for _ in range(64)] if multiplexed else []
    idle: list[HttpClient] = []
    opened, unsent, sent = 0, 0, 0
    tasks: set[asyncio.Task] = set()
    rng = np.random.default_rng(seed)

    async def fire(sender: HttpClient, request: bytes, scheduled: float) -> None:
        status, headers = await sender.send(request)
        tally.record(status, time.perf_counter() - scheduled if status else 0.0, headers)
        if not multiplexed:
            idle.append(sender)

    started = time.perf_counter()
    arrival = started
    try:
        while sent < limit:
            arrival += rng.exponential(1 / rate)
            if arrival - started >= duration:
                break
            if (wait := arrival - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            if multiplexed:
                sender = pool[sent % len(pool)]
            elif idle:
                sender = idle.pop()
            elif opened < max_connections:
                sender, opened = client(host, port), opened + 1
                pool.append(sender)
            else:
                unsent += 1
                continue
            task = asyncio.create_task(fire(sender, requests[sent % len(requests)], arrival))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        elapsed = time.perf_counter() - started
        if tasks:
            _, late = await asyncio.wait(list(tasks), timeout=LINGER_SECONDS)
            for task in late:
                task.cancel()
                tally.record(None, 0.0)
    finally:
        for sender in pool:
            await sender.close()
    summary = tally.summary(elapsed)  # answered per second of offered load
    return {"rate": round(rate, 1), "sent": sent, "unsent": unsent, **summary}


def main(argv: list[str] | None = None, grpc_load: ModuleType | None = None) -> None:
    """The generator's command line; `grpc_load`: bench/grpc_load.py, whose own `main`
    passes itself (this module imports nothing of gRPC)."""
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=KINDS, default="png")
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--field", default="files", help="png: the multipart field name")
    parser.add_argument("--images", type=int, default=1, help="v2, grpc: images per request")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop: clients")
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument(
        "--no-wait", action="store_true", help="closed loop: ask again at once after a 503"
    )
    args = parser.parse_args(argv)
    host = "127.0.0.1"
    client: Client = HttpClient
    if args.kind.startswith("grpc"):
        if grpc_load is None:
            parser.error(f"--kind {args.kind}: run `python -m bench.grpc_load`")
        client = grpc_load.GrpcClient
        requests = grpc_load.build_requests(args.path, args.images, files=args.kind == "grpc-bytes")
    else:
        requests = build_requests(args.kind, host, args.path, args.field, args.images)
    if args.rate:
        work = open_loop(host, args.port, requests, args.rate, args.duration, args.requests,
                         client=client)  # fmt: skip
    else:
        work = closed_loop(host, args.port, requests, args.concurrency, args.duration,
                           args.requests, not args.no_wait, client)  # fmt: skip
    cpu = time.process_time()
    result = asyncio.run(work)
    # The generator's own CPU: on a machine it shares with the server, this is CPU the
    # server did not get (the benchmark reports it per answered request).
    result["client_cpu_s"] = round(time.process_time() - cpu, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
