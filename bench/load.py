"""Load generator: concurrent clients posting 32x32 PNGs to /predict over loopback.

Runs in its own process (`python -m bench.load ...`) so it does not share the server's
interpreter. Clients speak raw HTTP/1.1 over keep-alive connections with pre-built request
bytes, so the generator itself costs little CPU. Bounded by a request count and a
duration; prints one JSON object.
"""

import argparse
import asyncio
import io
import json
import time

import numpy as np
from PIL import Image


def png_images(count: int, seed: int = 0) -> list[bytes]:
    """Distinct 32x32 RGB PNGs: smooth colour fields with noise, like small photos."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
        field = coarse.repeat(8, axis=0).repeat(8, axis=1) + rng.normal(0, 12, (32, 32, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def multipart_body(image: bytes, filename: str) -> tuple[bytes, str]:
    """One PNG as the `files` field of a multipart form: (body, Content-Type)."""
    boundary = "benchboundary7d93"
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def multipart_request(path: str, host: str, image: bytes, index: int) -> bytes:
    body, content_type = multipart_body(image, f"bench{index}.png")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run(
    host: str, port: int, path: str, concurrency: int, duration: float, max_requests: int
) -> dict:
    requests = [multipart_request(path, host, png, i) for i, png in enumerate(png_images(64))]
    latencies: list[float] = []
    errors = {"http": 0, "connection": 0}
    issued = 0
    deadline = time.perf_counter() + duration

    async def client(offset: int) -> None:
        nonlocal issued
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                request = requests[(offset + issued) % len(requests)]
                issued += 1
                start = time.perf_counter()
                try:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
                    errors["connection"] += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                latencies.append(time.perf_counter() - start)
                if head[9:12] != b"200":
                    errors["http"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": errors["http"] + errors["connection"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args()
    result = asyncio.run(
        run("127.0.0.1", args.port, args.path, args.concurrency, args.duration, args.requests)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
