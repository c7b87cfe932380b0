"""Multipart uploads -> one uint8 tensor: what /predict and /explain both take.

Limits first (count, bytes per image), then every header (pixels per image and per
request), and only then pixels: a 32x32 image decodes inline in microseconds, anything
larger in the data plane's few decode slots.
"""

import numpy as np
from fastapi import UploadFile
from PIL import Image

from contract.images import decode, decoded_pixels, open_image
from contract.modelcard import IMAGE_SIZE
from service.dataplane import DataPlane
from service.errors import InvalidImage, TooManyImages, UploadTooLarge

SQUARE = (IMAGE_SIZE, IMAGE_SIZE)


async def read_images(
    plane: DataPlane, files: list[UploadFile], resize: bool, max_images: int
) -> np.ndarray:
    """uint8 [len(files), 32, 32, 3], or a 4xx that names the image at fault."""
    settings = plane.settings
    if not files:
        raise InvalidImage("send at least one image, as `files` (or `file`)")
    if len(files) > max_images:
        raise TooManyImages(f"{len(files)} images in one request; at most {max_images}")
    for index, upload in enumerate(files):
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise UploadTooLarge(
                f"{_name(index, upload)} is {upload.size:,} bytes; "
                f"the limit is {settings.max_upload_bytes:,} per image"
            )
    contents = []
    for upload in files:  # each part's buffer is freed as soon as its bytes are ours
        contents.append(await upload.read())
        await upload.close()
    opened = []  # headers only: cheap
    for index, (data, upload) in enumerate(zip(contents, files, strict=True)):
        try:
            opened.append(open_image(data, resize, settings.max_image_pixels))
        except (InvalidImage, UploadTooLarge) as err:
            raise type(err)(f"{_name(index, upload)}: {err.message}") from None
    total = sum(map(decoded_pixels, opened))
    if total > settings.max_request_pixels:
        raise UploadTooLarge(
            f"the images of this request would decode to {total:,} pixels; the limit is "
            f"{settings.max_request_pixels:,} per request (send fewer or smaller images)"
        )
    if any(image.size != SQUARE for image in opened):  # real decoding work: bounded
        return await plane.decode_large(lambda: _decode_all(opened, files))
    return _decode_all(opened, files)  # 32x32: microseconds, cheaper than a thread hop


def _decode_all(opened: list[Image.Image], files: list[UploadFile]) -> np.ndarray:
    images = []
    for index, (image, upload) in enumerate(zip(opened, files, strict=True)):
        try:
            images.append(decode(image))
        except InvalidImage as err:
            raise InvalidImage(f"{_name(index, upload)}: {err.message}") from None
    return np.stack(images)


def _name(index: int, upload: UploadFile) -> str:
    return f"image {index + 1} ({upload.filename!r})" if upload.filename else f"image {index + 1}"
