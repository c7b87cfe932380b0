"""What one request costs the server against what it sent: bytes sent and received,
status, server CPU-seconds and peak RSS growth, one request at a time, from /proc.

Requests go one after another on fresh connections (`Connection: close`), each answer
read to its end, so the CPU and memory measured over a request are that request's (plus
the server's idle bookkeeping, a few milliseconds). Peak RSS growth covers the server's
whole process tree (bench/procfs.py). Used for the faults table's amplification rows."""

import asyncio
import contextlib
import time
from typing import Protocol

from bench.load import http_request
from bench.procfs import PeakGrowth, cpu_seconds
from bench.servers import HOST

SETTLE_SECONDS = 0.1  # before and after a measurement: the workers' bookkeeping
TIMEOUT_SECONDS = 120.0  # per request


class Case(Protocol):
    """A request and the statuses documented for it (bench/hostile.py's `Case`)."""

    name: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    expected: frozenset[int] | set[int]


def request_bytes(case: Case) -> bytes:
    """The case as it goes on the wire, closing the connection after the answer."""
    headers = dict(case.headers)
    if "connection" not in {name.lower() for name in headers}:
        headers["Connection"] = "close"
    return http_request(case.path, HOST, case.body, headers, case.method)


async def exchange(port: int, request: bytes, timeout: float = TIMEOUT_SECONDS) -> dict:
    """Send `request` while reading the answer to the end of the connection (a server may
    answer before it has read the body): {"status": int | None, "received": bytes}."""
    reader, writer = await asyncio.open_connection(HOST, port)

    async def send() -> None:
        with contextlib.suppress(OSError):
            writer.write(request)
            await writer.drain()

    sending = asyncio.ensure_future(send())
    first, received = b"", 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(1 << 16):
                first += chunk[: 16 - len(first)]
                received += len(chunk)
    except (OSError, TimeoutError):
        pass
    finally:
        sending.cancel()
        writer.close()
    status = int(first[9:12]) if first.startswith(b"HTTP/1.") and first[9:12].isdigit() else None
    return {"status": status, "received": received}


def measure(port: int, pid: int, request: bytes, repeats: int = 1) -> dict:
    """`repeats` sequential sends of `request` to the server `pid` (its whole process
    tree): statuses, and per request: bytes sent and received, CPU-seconds, wall ms; the
    peak RSS growth over all of them."""
    time.sleep(SETTLE_SECONDS)
    answers, started = [], time.perf_counter()
    with PeakGrowth(pid) as peak:
        before = cpu_seconds(pid)
        for _ in range(repeats):
            answers.append(asyncio.run(exchange(port, request)))
        wall = time.perf_counter() - started
        time.sleep(SETTLE_SECONDS)
        used = cpu_seconds(pid) - before
    return {
        "statuses": sorted({a["status"] for a in answers}, key=lambda s: (s is None, s)),
        "bytes_sent": len(request),
        "bytes_received": max(a["received"] for a in answers),
        "cpu_seconds_per_request": round(used / repeats, 4),
        "wall_ms_per_request": round(1000 * wall / repeats, 1),
        "rss_growth_mib": peak.mib,
        "rss_method": peak.method,
    }
