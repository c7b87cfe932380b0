"""Encoded images -> the uint8 [N, 32, 32, 3] tensor the model takes, with the bounds
every way in shares: /predict's and /explain's uploads, and the Open Inference
Protocol's BYTES input over HTTP and gRPC.

Limits first (count, bytes per image), then every header (pixels per image and per
request), and only then pixels: a 32x32 image decodes inline in microseconds, anything
larger in a few decode slots at once (`DecodeSlots`): each can cost a CPU for a while and
tens of MB, so beyond MAX_LARGE_DECODES they are shed (503 / RESOURCE_EXHAUSTED)
instead of queueing CPU work.
"""

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from PIL import Image

from contract.images import decode, decoded_pixels, open_image, release_memory
from contract.modelcard import IMAGE_SIZE
from service.config import Settings
from service.errors import InvalidImage, Overloaded, TooManyImages, UploadTooLarge, quoted

T = TypeVar("T")
SQUARE = (IMAGE_SIZE, IMAGE_SIZE)


class DecodeSlots:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0

    async def run(self, decode: Callable[[], T]) -> T:
        if self.busy >= self.slots:
            raise Overloaded(
                f"{self.slots} requests are already decoding large images; retry shortly"
            )
        self.busy += 1  # the event loop is single-threaded: no lock needed
        try:
            return await asyncio.to_thread(self._decode_then_trim, decode)
        finally:
            self.busy -= 1

    def _decode_then_trim(self, decode: Callable[[], T]) -> T:
        try:
            return decode()
        finally:
            if self.busy == 1:  # the last one out hands the burst's memory back
                release_memory()


async def read_images(
    files: Sequence[tuple[str | None, bytes]],
    resize: bool,
    max_images: int,
    settings: Settings,
    slots: DecodeSlots,
) -> np.ndarray:
    """uint8 [len(files), 32, 32, 3] from (name, encoded bytes) pairs, or a 4xx that names
    the image at fault."""
    if not files:
        raise InvalidImage("send at least one image, as `files` (or `file`)")
    if len(files) > max_images:
        raise TooManyImages(f"{len(files)} images in one request; at most {max_images}")
    for index, (name, data) in enumerate(files):
        if len(data) > settings.max_upload_bytes:
            raise UploadTooLarge(
                f"{_name(index, name)} is {len(data):,} bytes; "
                f"the limit is {settings.max_upload_bytes:,} per image"
            )
    opened = []  # headers only: cheap
    for index, (name, data) in enumerate(files):
        try:
            opened.append(open_image(data, resize, settings.max_image_pixels))
        except (InvalidImage, UploadTooLarge) as err:
            raise type(err)(f"{_name(index, name)}: {err.message}") from None
    total = sum(map(decoded_pixels, opened))
    if total > settings.max_request_pixels:
        raise UploadTooLarge(
            f"the images of this request would decode to {total:,} pixels; the limit is "
            f"{settings.max_request_pixels:,} per request (send fewer or smaller images)"
        )
    names = [name for name, _ in files]
    if any(image.size != SQUARE for image in opened):  # real decoding work: bounded
        return await slots.run(lambda: _decode_all(opened, names))
    return _decode_all(opened, names)  # 32x32: microseconds, cheaper than a thread hop


def _decode_all(opened: list[Image.Image], names: list[str | None]) -> np.ndarray:
    images = []
    for index, (image, name) in enumerate(zip(opened, names, strict=True)):
        try:
            images.append(decode(image))
        except InvalidImage as err:
            raise InvalidImage(f"{_name(index, name)}: {err.message}") from None
    return np.stack(images)


def _name(index: int, name: str | None) -> str:
    return f"image {index + 1} ({quoted(name, 100)})" if name else f"image {index + 1}"
