"""open_image + decode on damaged files: every failure is a clear domain error, never a crash."""

import io

import numpy as np
import pytest
from PIL import Image

from contract.images import decode, open_image
from service.errors import InvalidImage, UploadTooLarge
from tests.synthetic import make_images

FORMATS = {
    "PNG": {},
    "JPEG": {},
    "BMP": {},
    "GIF": {},
    "WEBP": {},
    "TIFF": {"compression": "tiff_lzw"},
}


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_images(np.array([5]), seed=0)[0]).save(buffer, fmt, **FORMATS[fmt])
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_decodes_to_32x32_rgb(fmt):
    pixels = decode(open_image(encoded(fmt), False, 1 << 24))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


@pytest.mark.filterwarnings("ignore:.*:UserWarning")  # Pillow warns about the damage, rightly
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_damaged_files_fail_cleanly(fmt):
    """Truncations and random byte flips: decoded, or refused with a domain error."""
    data = encoded(fmt)
    rng = np.random.default_rng(len(data))
    damaged = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 40))]
    for _ in range(150):
        flipped = bytearray(data)
        for position in rng.integers(0, len(data), size=rng.integers(1, 8)):
            flipped[position] = rng.integers(0, 256)
        damaged.append(bytes(flipped))
    for sample in damaged:
        for resize in (False, True):
            try:
                pixels = decode(open_image(sample, resize, 1 << 20))
            except (InvalidImage, UploadTooLarge):
                continue
            assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
