"""The load generator's gRPC clients: the Open Inference Protocol's ModelInfer over
HTTP/2, closed loop or open loop, as bench/load.py does over HTTP/1.1.

Requests are pre-built and pre-serialized (raw uint8 tensors in `raw_input_contents`, the
form tritonclient.grpc and perf_analyzer send), and the answers are not parsed, so the
generator costs little CPU. Each closed-loop client has a channel (a connection) of its
own, like the HTTP clients' keep-alive connections; the open loop spreads its arrivals
over as many channels. Outcomes go into the same tally as HTTP's, by the HTTP status
each gRPC code stands for: OK 200; RESOURCE_EXHAUSTED and UNAVAILABLE 503 (shed; the
`retry-after` trailing metadata is their Retry-After); other client errors 4xx.
"""

import asyncio
import sys
import time

import grpc
import numpy as np

from bench import load
from bench.load import LINGER_SECONDS, Tally, pixel_images, retry_after
from service.rpc import inference_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
AS_HTTP = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]


def infer_request(model: str, images: np.ndarray) -> bytes:
    """A serialized ModelInferRequest: `images` as raw bytes, probabilities asked."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
    request.outputs.add(name="probabilities")
    request.raw_input_contents.append(images.tobytes())
    return request.SerializeToString()


def build_requests(model: str, images_per_request: int = 1) -> list[bytes]:
    """64 distinct pre-built requests, as bench/load.py's."""
    pixels = pixel_images(64 + images_per_request)
    return [infer_request(model, pixels[i : i + images_per_request]) for i in range(64)]


def _channel(host: str, port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"{host}:{port}", options=CHANNEL_OPTIONS)


def _call(channel: grpc.aio.Channel):
    # Bytes in, bytes out: no (de)serialization on the generator's side.
    return channel.unary_unary(METHOD)


async def _send(call, request: bytes) -> tuple[int | None, dict[str, str]]:
    """(the HTTP status the outcome stands for, its trailing metadata by lower-case name)."""
    try:
        await call(request)
        return 200, {}
    except grpc.aio.AioRpcError as err:
        trailers = {k.lower(): v for k, v in (err.trailing_metadata() or ())
                    if isinstance(v, str)}  # fmt: skip
        return AS_HTTP.get(err.code()), trailers


async def closed_loop(
    host: str, port: int, requests: list[bytes], concurrency: int, duration: float, limit: int
) -> dict:
    """`concurrency` clients, each with one call in flight and a channel of its own; one
    told to come back later waits as `retry-after` says (within the run)."""
    tally = Tally()
    issued = 0
    deadline = time.perf_counter() + duration

    async def client(offset: int) -> None:
        nonlocal issued
        async with _channel(host, port) as channel:
            call = _call(channel)
            while issued < limit and time.perf_counter() < deadline:
                request = requests[(offset + issued) % len(requests)]
                issued += 1
                start = time.perf_counter()
                status, trailers = await _send(call, request)
                tally.record(status, time.perf_counter() - start, trailers)
                if status == 503 and (after := retry_after(trailers)) is not None:
                    await asyncio.sleep(max(0.0, min(after, deadline - time.perf_counter())))

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return {"concurrency": concurrency, **tally.summary(time.perf_counter() - started)}


async def open_loop(
    host: str,
    port: int,
    requests: list[bytes],
    rate: float,
    duration: float,
    limit: int,
    channels: int = 64,
    seed: int = 0,
) -> dict:
    """Calls arrive at `rate` per second on average (exponential gaps), spread over
    `channels` channels; latency counts from the scheduled arrival. HTTP/2 carries many
    calls on a channel, so no arrival goes unsent."""
    tally = Tally()
    rng = np.random.default_rng(seed)
    tasks: set[asyncio.Task] = set()
    opened = [_channel(host, port) for _ in range(channels)]
    calls = [_call(channel) for channel in opened]

    async def fire(call, request: bytes, scheduled: float) -> None:
        status, trailers = await _send(call, request)
        tally.record(status, time.perf_counter() - scheduled, trailers)

    started = time.perf_counter()
    arrival = started
    sent = 0
    try:
        while sent < limit:
            arrival += rng.exponential(1 / rate)
            if arrival - started >= duration:
                break
            if (wait := arrival - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            call = calls[sent % channels]
            task = asyncio.create_task(fire(call, requests[sent % len(requests)], arrival))
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
        for channel in opened:
            await channel.close()
    return {"rate": round(rate, 1), "sent": sent, "unsent": 0, **tally.summary(elapsed)}


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.grpc_load --kind grpc --port GRPC_PORT --path MODEL ...`"""
    load.main(argv, grpc_loops=sys.modules[__name__])


if __name__ == "__main__":
    main()
