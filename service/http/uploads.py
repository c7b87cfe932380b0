"""Multipart uploads -> one uint8 tensor, for /explain (the one route still on FastAPI's
forms): the parts' bytes handed to the decoder every way in shares
(service/decoding.py), which checks their count and size before any header is read."""

import numpy as np
from fastapi import UploadFile

from service.dataplane import DataPlane
from service.decoding import read_images as decode_files


async def read_images(
    plane: DataPlane, files: list[UploadFile], resize: bool, max_images: int
) -> np.ndarray:
    """uint8 [len(files), 32, 32, 3], or a 4xx that names the image at fault."""
    contents = []
    for upload in files:  # each part's buffer is freed as soon as its bytes are ours
        contents.append((upload.filename, await upload.read()))
        await upload.close()
    return await decode_files(contents, resize, max_images, plane.settings, plane.decode_slots)
