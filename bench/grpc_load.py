"""The load generator's gRPC client: the Open Inference Protocol's ModelInfer over
HTTP/2, for bench/load.py's closed and open loops (the same loops, tally and Retry-After
wait as HTTP's; `python -m bench.grpc_load` takes bench/load.py's options).

Requests are pre-built and pre-serialized (raw uint8 tensors in `raw_input_contents`,
the form tritonclient.grpc and perf_analyzer send; or PNG files as BYTES, framed with
4-byte lengths as tritonclient sends them), and the answers are not parsed, so the
generator costs little CPU. Each client is a channel (a connection) of its own, like the
HTTP clients' keep-alive connections. Outcomes go into the same tally as HTTP's, by the
HTTP status each gRPC code stands for: OK 200; RESOURCE_EXHAUSTED and UNAVAILABLE 503
(shed; the `retry-after` trailing metadata is their Retry-After); other client errors 4xx.
"""

import sys

import grpc
import numpy as np

from bench import load
from bench.load import framed, pixel_images, png_images
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


def infer_request(model: str, images: np.ndarray | list[bytes]) -> bytes:
    """A serialized ModelInferRequest: pixels as raw bytes, or encoded images as BYTES;
    probabilities asked."""
    request = pb.ModelInferRequest(model_name=model)
    if isinstance(images, np.ndarray):
        request.inputs.add(name="images", datatype="UINT8", shape=images.shape)
        request.raw_input_contents.append(images.tobytes())
    else:
        request.inputs.add(name="image_files", datatype="BYTES", shape=[len(images)])
        request.raw_input_contents.append(framed(images))
    request.outputs.add(name="probabilities")
    return request.SerializeToString()


def build_requests(model: str, images_per_request: int = 1, files: bool = False) -> list[bytes]:
    """64 distinct pre-built requests, as bench/load.py's (`files`: PNGs as BYTES)."""
    count = 64 + images_per_request
    images = png_images(count) if files else pixel_images(count)
    return [infer_request(model, images[i : i + images_per_request]) for i in range(64)]


class GrpcClient:
    """One channel; `send` is a unary call, bytes in, bytes out (no (de)serialization on
    the generator's side). HTTP/2 carries many calls at once on it."""

    MULTIPLEXED = True

    def __init__(self, host: str, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"{host}:{port}", options=CHANNEL_OPTIONS)
        self.call = self.channel.unary_unary(METHOD)

    async def send(self, request: bytes) -> tuple[int | None, dict[str, str]]:
        """(the HTTP status the outcome stands for, its trailing metadata by name)."""
        try:
            await self.call(request)
            return 200, {}
        except grpc.aio.AioRpcError as err:
            trailers = {k.lower(): v for k, v in (err.trailing_metadata() or ())
                        if isinstance(v, str)}  # fmt: skip
            return AS_HTTP.get(err.code()), trailers

    async def close(self) -> None:
        await self.channel.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.grpc_load --kind grpc --port GRPC_PORT --path MODEL ...`"""
    load.main(argv, grpc_load=sys.modules[__name__])


if __name__ == "__main__":
    main()
