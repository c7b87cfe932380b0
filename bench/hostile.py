"""A hostile corpus: requests whose cost could be out of proportion to their size.

Each `Case` is one complete HTTP request (method, path, headers, body) and the statuses
the service documents for it; each `GrpcCase` one serialized ModelInfer message and the
gRPC status codes documented for it. Encoded images come through /predict, through /v2's
BYTES input (JSON and binary) and over gRPC (`bytes_contents`, raw contents). The tests
send every case to a real `python -m service` and bound the server's peak memory growth
by the bytes sent; `python -m bench faults` prints the same cases as an amplification
table. The generators build the files by
hand (chunk by chunk, marker by marker) where Pillow would refuse to write them.
"""

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from bench.load import multipart_form

SIDE = 32
MIB = 1 << 20
# The bound every case is held to (tests/test_hostile.py; flagged in the faults table):
# the server's peak resident memory may grow by GROWTH_PER_BYTE times the bytes sent plus
# GROWTH_CONSTANT, and its answer may be at most ANSWER_SLACK bytes longer than the request.
GROWTH_PER_BYTE = 4
GROWTH_CONSTANT = 48 * MIB
ANSWER_SLACK = 64 * 1024


def growth_bound(bytes_sent: int) -> int:
    return GROWTH_PER_BYTE * bytes_sent + GROWTH_CONSTANT


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    expected: frozenset[int]
    why: str = field(default="", compare=False)


def cases(model_id: str, max_images: int = 64) -> list[Case]:
    """Every hostile case against `model_id`, a few MB in all."""
    infer = f"/v2/models/{model_id}/infer"
    pixels = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    return [
        # --- /predict: images whose metadata or structure costs more than their pixels
        predict("png-ztxt", [png_with(pixels, text_chunks(b"zTXt", 64))] * 16, {422},
                "16 PNGs, each 64 zTXt chunks inflating to 1 MiB: refused at the 256 KiB cap"),
        predict("png-itxt", [png_with(pixels, text_chunks(b"iTXt", 64))] * 16, {422},
                "compressed iTXt chunks, the same"),
        predict("png-iccp", [png_with(pixels, [png_chunk(b"iCCP", b"p\0\0" + zeros(16))])] * 16,
                {422}, "an ICC profile inflating to 16 MiB: refused at the cap"),
        predict("jpeg-exif-xmp", [jpeg_with_app_segments(pixels, 15)] * 16, {200},
                "JPEGs with 15 APP1 (EXIF/XMP) segments of 64 KB each"),
        predict("jpeg-many-scans", [progressive_jpeg(pixels)] * 16, {200},
                "progressive JPEGs (Pillow's scan script, about 10 scans each)"),
        predict("gif-many-frames", [gif_frames(pixels, 1000)] * 4, {200},
                "GIFs of 1,000 frames: only the first is decoded"),
        predict("tiff-many-pages", [tiff_pages(pixels, 200)] * 4, {200},
                "multi-page TIFFs: only the first page is decoded"),
        predict("too-many-images", [png_with(pixels, [])] * (max_images + 1), {413},
                "one image more than a request may carry"),
        # --- /v2: JSON whose parse or answer could cost more than its bytes
        v2("json-deep", infer, b"[" * 100_000, {400}, "100,000 nested arrays"),
        v2("json-wide-empties", infer, v2_body(data="[" + "[]," * 300_000 + "[]]"), {400},
           "900 KB of empty arrays where numbers belong"),
        v2("json-too-large", infer, b" " * (3 * MIB) + b"{}", {413},
           "a 3 MiB body: above what any valid v2 request needs"),
        v2("outputs-repeated", infer, v2_body(outputs=[{"name": "probabilities"}] * 200,
                                              images=max_images), {400},
           "the same output asked 200 times"),
        v2("outputs-unknown", infer, v2_body(outputs=[{"name": "logits"}]), {400},
           "an output the model does not have"),
        v2("classification-huge", infer, v2_body(outputs=[
            {"name": "probabilities", "parameters": {"classification": 10**9}}]), {400},
           "top-k with k far above the class count"),
        v2("id-nan", infer, v2_body(id="NaN"), {400}, "NaN as the request id"),
        v2("parameters-infinity", infer, v2_body(parameters="{\"x\": Infinity}"), {400},
           "Infinity in the parameters"),
        v2("data-float", infer, v2_body(data=json.dumps([1.9] * SIDE * SIDE * 3)), {400},
           "floats for a UINT8 input"),
        v2("data-bool", infer, v2_body(data=json.dumps([True] * SIDE * SIDE * 3)), {400},
           "booleans for a UINT8 input"),
        v2("data-string", infer, v2_body(data=json.dumps(["1"] * SIDE * SIDE * 3)), {400},
           "strings for a UINT8 input"),
        v2("data-out-of-range", infer, v2_body(data=json.dumps([256] * SIDE * SIDE * 3)),
           {400}, "256 for a UINT8 input"),
        v2("shape-lies", infer, v2_body(shape=[max_images, SIDE, SIDE, 3]), {400},
           "a shape of 64 images with the data of one"),
        # --- /v2 BYTES: encoded images, decoded by /predict's code and limits
        files_binary("bytes-png-ztxt", infer, [png_with(pixels, text_chunks(b"zTXt", 64))] * 16,
                     {422}, "16 PNGs with zTXt bombs as BYTES binary data: refused at the cap"),
        files_binary("bytes-pixel-bomb", infer, [png_claiming(100_000, 100_000)] * 4, {413},
                     "PNG headers claiming 10^10 pixels each"),
        files_binary("bytes-gif-frames", infer, [gif_frames(pixels, 1000)] * 4, {200},
                     "GIFs of 1,000 frames: only the first is decoded"),
        files_framed("bytes-frame-lies", infer, struct.pack("<I", 2**31) + b"x" * 16, 1, {400},
                     "an element claiming 2 GiB, 16 bytes sent"),
        v2("bytes-too-many", infer, files_json([b"\0"] * (max_images + 1)), {413},
           "one encoded image more than a request may carry"),
        v2("bytes-not-base64", infer, files_json(None, ["%%%%"] * 4), {400},
           "strings that are not base64"),
    ]  # fmt: skip


@dataclass(frozen=True)
class GrpcCase:
    name: str
    message: bytes  # a serialized inference.ModelInferRequest (or not)
    expected: frozenset[str]  # gRPC status code names
    why: str = field(default="", compare=False)


def grpc_cases(model_id: str, max_images: int = 64) -> list[GrpcCase]:
    """Hostile ModelInfer messages: undecodable bytes, client text to echo, typed values
    beyond any request, and encoded images whose decoding could cost more than their size."""
    from service.rpc import inference_pb2 as pb

    pixels = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)

    def infer(name: str = model_id, **fields) -> pb.ModelInferRequest:
        return pb.ModelInferRequest(model_name=name, **fields)

    def files(elements: list[bytes], framed: bool) -> bytes:
        request = infer()
        tensor = request.inputs.add(name="image_files", datatype="BYTES", shape=[len(elements)])
        if framed:
            request.raw_input_contents.append(b"".join(struct.pack("<I", len(e)) + e
                                                       for e in elements))  # fmt: skip
        else:
            tensor.contents.bytes_contents.extend(elements)
        return request.SerializeToString()

    long_name = infer("m" * 300_000)
    long_name.inputs.add(name="images", datatype="UINT8", shape=[1, SIDE, SIDE, 3])
    values = infer()
    tensor = values.inputs.add(name="images", datatype="UINT8", shape=[1, SIDE, SIDE, 3])
    tensor.contents.uint_contents.extend([7] * (max_images * SIDE * SIDE * 3 + 1))
    lying = infer()
    lying.inputs.add(name="image_files", datatype="BYTES", shape=[1])
    lying.raw_input_contents.append(struct.pack("<I", 2**31) + b"x" * 16)
    return [
        GrpcCase("grpc-undecodable", b"\xff" * 4096, frozenset({"INVALID_ARGUMENT"}),
                 "4 KB that are not protobuf"),
        GrpcCase("grpc-model-name-300kb", long_name.SerializeToString(),
                 frozenset({"NOT_FOUND"}), "a 300 KB model name: not echoed whole"),
        GrpcCase("grpc-values-beyond-any-request", values.SerializeToString(),
                 frozenset({"INVALID_ARGUMENT"}), "one typed value more than any request holds"),
        GrpcCase("grpc-bytes-frame-lies", lying.SerializeToString(),
                 frozenset({"INVALID_ARGUMENT"}), "an element claiming 2 GiB, 16 bytes sent"),
        GrpcCase("grpc-bytes-png-ztxt", files([png_with(pixels, text_chunks(b"zTXt", 64))] * 4,
                                              framed=False),
                 frozenset({"INVALID_ARGUMENT"}), "PNGs with zTXt bombs in bytes_contents"),
        GrpcCase("grpc-bytes-pixel-bomb", files([png_claiming(100_000, 100_000)] * 4, framed=True),
                 frozenset({"INVALID_ARGUMENT"}), "PNG headers claiming 10^10 pixels, framed"),
        GrpcCase("grpc-bytes-too-many", files([b"\0"] * (max_images + 1), framed=False),
                 frozenset({"INVALID_ARGUMENT"}), "one image more than a request may carry"),
    ]  # fmt: skip


# --- requests ----------------------------------------------------------------------------


def predict(name: str, images: list[bytes], expected: set[int], why: str) -> Case:
    body, content_type = multipart_form([(f"{i}.img", data) for i, data in enumerate(images)])
    headers = {"Content-Type": content_type}
    return Case(name, "POST", "/predict", headers, body, frozenset(expected), why)


def v2(name: str, path: str, body: bytes, expected: set[int], why: str) -> Case:
    headers = {"Content-Type": "application/json"}
    return Case(name, "POST", path, headers, body, frozenset(expected), why)


def files_binary(name: str, path: str, images: list[bytes], expected: set[int],
                 why: str) -> Case:  # fmt: skip
    """Encoded images as /v2's BYTES input with binary data (Triton's framing)."""
    return files_framed(name, path, b"".join(struct.pack("<I", len(i)) + i for i in images),
                        len(images), expected, why)  # fmt: skip


def files_framed(name: str, path: str, framed: bytes, count: int, expected: set[int],
                 why: str) -> Case:  # fmt: skip
    """A /v2 request: a JSON header, then `framed` as the `image_files` input's binary data."""
    tensor = {"name": "image_files", "datatype": "BYTES", "shape": [count],
              "parameters": {"binary_data_size": len(framed)}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": str(len(header))}  # fmt: skip
    return Case(name, "POST", path, headers, header + framed, frozenset(expected), why)


def files_json(images: list[bytes] | None, texts: list[str] | None = None) -> bytes:
    """Encoded images as /v2's BYTES input in JSON (base64 strings, or `texts` as given)."""
    data = texts if texts is not None else [base64.b64encode(i).decode() for i in images or []]
    return json.dumps({"inputs": [{"name": "image_files", "datatype": "BYTES",
                                   "shape": [len(data)], "data": data}]}).encode()  # fmt: skip


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking 1x1 PNG whose header claims `width` x `height` pixels."""
    png = png_with(np.zeros((1, 1, 3), np.uint8), [])
    header = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:]


def v2_body(
    *,
    id: str | None = None,
    parameters: str | None = None,
    data: str | None = None,
    shape: list[int] | None = None,
    outputs: list[dict] | None = None,
    images: int = 1,
) -> bytes:
    """A v2 JSON request, assembled as text so that NaN and odd data survive."""
    shape = shape or [images, SIDE, SIDE, 3]
    data = data or json.dumps([7] * (images * SIDE * SIDE * 3))
    tensor = f'{{"name": "images", "datatype": "UINT8", "shape": {json.dumps(shape)}, '
    tensor += f'"data": {data}}}'
    text = f'{{"inputs": [{tensor}]'
    if id is not None:
        text += f', "id": {id}'
    if parameters is not None:
        text += f', "parameters": {parameters}'
    if outputs is not None:
        text += f', "outputs": {json.dumps(outputs)}'
    return (text + "}").encode()


# --- files ---------------------------------------------------------------------------------


def zeros(mib: int) -> bytes:
    """`mib` MiB of zeros, deflated (about 1 KB per MiB)."""
    return zlib.compress(b"\0" * (mib * MIB), 9)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_chunks(kind: bytes, count: int) -> list[bytes]:
    """Compressed text chunks (zTXt, or iTXt with its compression flag), 1 MiB each inflated."""
    if kind == b"zTXt":
        return [png_chunk(kind, b"k%d\0\0" % i + zeros(1)) for i in range(count)]
    return [png_chunk(kind, b"k%d\0\1\0\0\0" % i + zeros(1)) for i in range(count)]


def png_with(pixels: np.ndarray, chunks: list[bytes]) -> bytes:
    """A valid PNG of `pixels` with `chunks` inserted before its image data."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    png = buffer.getvalue()
    after_header = 8 + 25  # signature, then IHDR (length, type, 13 bytes, crc)
    return png[:after_header] + b"".join(chunks) + png[after_header:]


def jpeg_with_app_segments(pixels: np.ndarray, count: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    payload = b"Exif\0\0" + b"\0" * 65_000
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + segment * count + jpeg[2:]


def progressive_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, progressive=True)
    return buffer.getvalue()


def gif_frames(pixels: np.ndarray, count: int) -> bytes:
    frames = [Image.fromarray(np.roll(pixels, i, axis=0)).quantize(16) for i in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=10)
    return buffer.getvalue()


def tiff_pages(pixels: np.ndarray, count: int) -> bytes:
    pages = [Image.fromarray(np.roll(pixels, i, axis=1)) for i in range(count)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    return buffer.getvalue()
