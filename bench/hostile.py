"""A hostile corpus: requests whose cost could be out of proportion to their size.

Each `Case` is one complete HTTP request (method, path, headers, body) and the statuses
the service documents for it. The tests send every case to a real `python -m service`
and bound the server's peak memory growth by the bytes sent; `python -m bench faults`
prints the same cases as an amplification table. The generators build the files by
hand (chunk by chunk, marker by marker) where Pillow would refuse to write them.
"""

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
    ]  # fmt: skip


# --- requests ----------------------------------------------------------------------------


def predict(name: str, images: list[bytes], expected: set[int], why: str) -> Case:
    body, content_type = multipart_form([(f"{i}.img", data) for i, data in enumerate(images)])
    headers = {"Content-Type": content_type}
    return Case(name, "POST", "/predict", headers, body, frozenset(expected), why)


def v2(name: str, path: str, body: bytes, expected: set[int], why: str) -> Case:
    headers = {"Content-Type": "application/json"}
    return Case(name, "POST", path, headers, body, frozenset(expected), why)


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
