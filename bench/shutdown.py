"""The SIGTERM rows of `python -m bench faults`: what the server does with the requests it
has accepted when it is told to stop, under load and with an upload still arriving.

A request lost is one fully sent on a connection the server had already answered on,
and never answered; connections reset or refused after SIGTERM are counted apart (they
may never have been accepted: the kernel's backlog)."""

import argparse
import asyncio
import signal
import subprocess
import time

from bench.load import (
    Tally,
    build_requests,
    http_request,
    multipart_body,
    png_images,
    read_response,
)
from bench.servers import HOST


async def _wait_exit(process: subprocess.Popen, limit: float) -> float | None:
    """Seconds until `process` exits (None past `limit`)."""
    started = time.perf_counter()
    while process.poll() is None:
        if time.perf_counter() - started > limit:
            return None
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


async def sigterm_under_load(
    port: int, process: subprocess.Popen, args: argparse.Namespace
) -> dict:
    """64 keep-alive clients; SIGTERM; they go on (reconnecting on `Connection: close` or
    a refused connect) until the server has exited."""
    requests = build_requests("png", HOST, "/predict")
    tally_before, tally_after = Tally(), Tally()
    counts = {"lost": 0, "reset_new_connection": 0, "refused_connect": 0, "unsent": 0}
    term_at: list[float] = []
    done = asyncio.Event()

    async def client(offset: int) -> None:
        connection, served, issued = None, 0, 0
        while not done.is_set():
            if connection is None:
                try:
                    connection = await asyncio.open_connection(HOST, port)
                except OSError:
                    counts["refused_connect"] += 1
                    await asyncio.sleep(0.05)
                    continue
                served = 0
            reader, writer = connection
            request = requests[(offset + issued) % len(requests)]
            issued += 1
            started = time.perf_counter()
            try:
                writer.write(request)
                await writer.drain()
            except OSError:
                counts["unsent"] += 1  # not fully sent: not an accepted request
                writer.close()
                connection = None
                continue
            try:
                status, keep_alive = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                # No answer to a request fully sent. On a connection that had answered
                # before, the server had accepted it: a loss. On a new one it may have
                # sat in the kernel's backlog, never accepted: counted apart.
                counts["lost" if served else "reset_new_connection"] += 1
                writer.close()
                connection = None
                continue
            served += 1
            tally = tally_after if term_at and started >= term_at[0] else tally_before
            tally.record(status, time.perf_counter() - started)
            if not keep_alive:
                writer.close()
                connection = None
            if status == 503:  # shed at the door: wait as Retry-After says, like closed_loop
                await asyncio.sleep(1.0)
        if connection is not None:
            connection[1].close()

    clients = [asyncio.ensure_future(client(i)) for i in range(64)]
    await asyncio.sleep(max(1.0, args.seconds / 2))
    term_at.append(time.perf_counter())
    process.send_signal(signal.SIGTERM)
    shutdown = await _wait_exit(process, 60)
    done.set()
    await asyncio.wait(clients, timeout=10)
    before, after = tally_before.summary(1), tally_after.summary(1)
    return {
        "fault": "SIGTERM under load",
        "load": "64 keep-alive clients on /predict; SIGTERM to the server's main process",
        "answered_before": before["requests"],
        "answered_after": after["requests"],
        # 64 clients are more than 2 CPUs answer within MAX_QUEUE_DELAY_MS: some are shed
        # (503 + Retry-After), counted apart; a failure is any other non-200.
        "shed_after": after["shed"],
        "failed_after": after["refused"] + after["errors"],
        **counts,
        "shutdown_seconds": None if shutdown is None else round(shutdown, 2),
    }


async def slow_upload_sigterm(
    port: int, process: subprocess.Popen, args: argparse.Namespace
) -> dict:
    """An upload arriving in pieces (gaps under BODY_TIMEOUT_SECONDS) when SIGTERM comes."""
    body, content_type = multipart_body(png_images(1)[0], "upload.png")
    request = http_request("/predict", HOST, body, {"Content-Type": content_type})
    pieces = 10
    gap = args.client_timeout / 4
    size = -(-len(request) // pieces)
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(request[:size])
    await writer.drain()
    term = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    exit_task = asyncio.ensure_future(_wait_exit(process, 60))
    status = None
    try:
        for start in range(size, len(request), size):
            await asyncio.sleep(gap)
            writer.write(request[start : start + size])
            await writer.drain()
        status, _ = await read_response(reader)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        pass
    answered = time.perf_counter() - term
    writer.close()
    shutdown = await exit_task
    return {
        "fault": "slow upload during SIGTERM",
        "load": f"one upload in {pieces} pieces, {gap:g} s apart; SIGTERM after the first",
        "upload_status": status,
        "upload_answered_after_s": round(answered, 2),
        "shutdown_seconds": None if shutdown is None else round(shutdown, 2),
    }
