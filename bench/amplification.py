"""What one request costs the server against what it sent: bytes sent and received,
status, server CPU-seconds and peak RSS growth, one request at a time, from /proc.

Requests go one after another on fresh connections (`Connection: close`), each answer
read to its end, so the CPU and memory measured over a request are that request's (plus
the server's idle bookkeeping, a few milliseconds). Peak RSS growth covers the server's
whole process tree (bench/procfs.py). Used for the faults table's amplification rows and
for the table of hostile cases (`python -m bench faults`)."""

import asyncio
import contextlib
import time

from bench.hostile import GROWTH_CONSTANT, GROWTH_PER_BYTE, Case, growth_bound
from bench.load import V2_HEADER, http_request, multipart_form, pixel_images, png_images, v2_body
from bench.procfs import PeakGrowth, cpu_seconds
from bench.servers import HOST

SETTLE_SECONDS = 0.1  # before and after a measurement: the workers' bookkeeping
TIMEOUT_SECONDS = 120.0  # per request


def request_bytes(case: Case) -> bytes:
    """The case as it goes on the wire, closing the connection after the answer."""
    headers = dict(case.headers)
    if "connection" not in {name.lower() for name in headers}:
        headers["Connection"] = "close"
    return http_request(case.path, HOST, case.body, headers, case.method)


async def exchange(port: int, request: bytes, timeout: float = TIMEOUT_SECONDS) -> dict:
    """Send `request` while reading the answer to the end of the connection (a server may
    answer before it has read the body): {"status": int | None, "received": byte count}."""
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


def warm_up(port: int, model_id: str, images: int = 64) -> None:
    """The largest legitimate requests on both paths, a few times each, so onnxruntime's
    arena and the allocator's pools are at their working size before a case is measured
    (else the first cases would be charged for them)."""
    body, content_type = multipart_form(
        [(f"{i}.png", png) for i, png in enumerate(png_images(images))]
    )
    tensors, length = v2_body(pixel_images(images))
    requests = [
        http_request("/predict", HOST, body, {"Content-Type": content_type, "Connection": "close"}),
        http_request(f"/v2/models/{model_id}/infer", HOST, tensors, {
            "Content-Type": "application/octet-stream", V2_HEADER: str(length),
            "Connection": "close",
        }),
    ]  # fmt: skip
    for request in requests * 4:  # every worker, most likely
        asyncio.run(exchange(port, request))


def hostile_rows(port: int, pid: int, cases: list[Case]) -> list[dict]:
    """Each case sent once: its measure, whether the status was one documented for it,
    and the ratios to the bytes sent (peak RSS growth, bytes answered)."""
    rows = []
    for case in cases:
        row = {"case": case.name, **measure(port, pid, request_bytes(case))}
        row["expected"] = sorted(case.expected)
        row["status"] = row.pop("statuses")[0]
        row["as_documented"] = row["status"] in case.expected
        row["rss_per_byte_sent"] = round(row["rss_growth_mib"] * 2**20 / row["bytes_sent"], 2)
        row["received_per_byte_sent"] = round(row["bytes_received"] / row["bytes_sent"], 2)
        print(f"  hostile {row}", flush=True)
        rows.append(row)
    return rows


def within_bound(row: dict) -> bool:
    return row["rss_growth_mib"] * 2**20 <= growth_bound(row["bytes_sent"])


def worst(rows: list[dict], key: str) -> dict:
    """The row with the highest `key`."""
    return max(rows, key=lambda row: row[key])


def hostile_markdown(rows: list[dict]) -> str:
    """The hostile cases' table, then the worst ratios, named."""
    lines = [
        "| case | bytes sent | status (documented) | bytes answered | server CPU s "
        "| peak RSS growth MiB | RSS growth / byte sent | answered / sent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = "" if r["as_documented"] else " **not documented**"
        mark += "" if within_bound(r) else " **RSS above the bound**"
        documented = "/".join(map(str, r["expected"]))
        lines.append(
            f"| {r['case']} | {r['bytes_sent']:,} | {r['status']} ({documented}){mark} "
            f"| {r['bytes_received']:,} | {r['cpu_seconds_per_request']} "
            f"| {r['rss_growth_mib']} | {r['rss_per_byte_sent']} "
            f"| {r['received_per_byte_sent']} |"
        )
    if rows:
        memory, answer = worst(rows, "rss_per_byte_sent"), worst(rows, "received_per_byte_sent")
        cpu = worst(rows, "cpu_seconds_per_request")
        odd = [r["case"] for r in rows if not r["as_documented"]]
        lines += [
            "",
            f"Worst ratios: peak RSS growth {memory['rss_per_byte_sent']} bytes per byte sent "
            f"({memory['case']}); answer {answer['received_per_byte_sent']} bytes per byte "
            f"sent ({answer['case']}); most CPU {cpu['cpu_seconds_per_request']} s "
            f"({cpu['case']}). Peak RSS from {rows[0]['rss_method']}, the server's process "
            f"tree. Statuses not documented: {', '.join(odd) or 'none'}. Bound: "
            f"{GROWTH_PER_BYTE} x bytes sent + {GROWTH_CONSTANT >> 20} MiB; above it: "
            f"{', '.join(r['case'] for r in rows if not within_bound(r)) or 'none'}.",
        ]
    return "\n".join(lines) + "\n"
