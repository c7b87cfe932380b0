"""Multipart uploads -> one uint8 tensor: what /predict and /explain both take, decoded
by the code every way in shares (service/decoding.py)."""

import numpy as np
from fastapi import UploadFile

from service.dataplane import DataPlane
from service.decoding import read_images as decode_files
from service.errors import InvalidImage, TooManyImages, UploadTooLarge, quoted


async def read_images(
    plane: DataPlane, files: list[UploadFile], resize: bool, max_images: int
) -> np.ndarray:
    """uint8 [len(files), 32, 32, 3], or a 4xx that names the image at fault."""
    settings = plane.settings
    if not files:
        raise InvalidImage("send at least one image, as `files` (or `file`)")
    if len(files) > max_images:
        raise TooManyImages(f"{len(files)} images in one request; at most {max_images}")
    for index, upload in enumerate(files):  # before any part is read
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            name = f"image {index + 1}" + (f" ({quoted(upload.filename, 100)})"
                                           if upload.filename else "")  # fmt: skip
            limit = settings.max_upload_bytes
            raise UploadTooLarge(f"{name} is {upload.size:,} bytes; the limit is {limit:,} "
                                 "per image")  # fmt: skip
    contents = []
    for upload in files:  # each part's buffer is freed as soon as its bytes are ours
        contents.append((upload.filename, await upload.read()))
        await upload.close()
    return await decode_files(contents, resize, max_images, settings, plane.decode_slots)
