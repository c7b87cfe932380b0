"""Uploaded bytes -> the uint8 [32, 32, 3] RGB array the model takes.

Only decoding and colour conversion live here: scaling and every other numeric
preprocessing is inside the ONNX graph. Decoding is split in two so that a request's
cost is known before any of it is paid: `open_image` reads a header (microseconds) and
says how many pixels decoding will produce; `decode` does the work.
"""

import ctypes
import ctypes.util
import functools
import io

import numpy as np
from PIL import Image, PngImagePlugin

from contract.errors import InvalidImage, UploadTooLarge
from contract.modelcard import IMAGE_SIZE

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
WHITE = (255, 255, 255, 255)
# Pillow inflates a PNG's compressed text and ICC chunks as it reads them: by default up
# to 1 MiB a chunk and 64 MiB of text an image, from a few KB sent. We read pixels only.
MAX_PNG_CHUNK = 256 * 1024
MAX_PNG_TEXT = 256 * 1024


# What decoding reads from `info`; every other entry is metadata (EXIF, XMP, ICC, text):
# dropped once the header is read, so a request holds its bytes once, not three times.
DECODE_INFO = {"transparency", "adobe", "adobe_transform", "progressive", "progression",
               "duration", "loop", "background", "compression"}  # fmt: skip


def bound_metadata() -> None:
    """Cap what a PNG's metadata may inflate to (Pillow's own, process-wide limits)."""
    PngImagePlugin.MAX_TEXT_CHUNK = MAX_PNG_CHUNK
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT


def open_image(data: bytes, resize: bool, max_pixels: int) -> Image.Image:
    """Read the header only; InvalidImage or UploadTooLarge with a message a user can act on.

    With `resize`, JPEGs are set to decode at a reduced scale (1/2 to 1/8), so the size
    checked against `max_pixels` is what decoding will really produce."""
    if not data:
        raise InvalidImage("the file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as err:  # claims more pixels than Pillow allows
        raise UploadTooLarge(f"the image header claims too many pixels: {err}") from None
    except ValueError as err:
        if "MAX_TEXT" not in str(err):
            raise InvalidImage(f"not an image we can read; send {', '.join(FORMATS)}") from None
        raise InvalidImage(
            f"the image's metadata (PNG text or ICC chunks) inflates to more than "
            f"{MAX_PNG_TEXT // 1024} KiB; strip it and send the pixels"
        ) from None
    except Exception:  # UnidentifiedImageError mostly; hostile headers can raise others
        raise InvalidImage(f"not an image we can read; send {', '.join(FORMATS)}") from None
    for key in [key for key in image.info if key not in DECODE_INFO]:
        del image.info[key]
    if hasattr(image, "applist"):  # JPEG keeps every APPn segment's bytes here too
        image.applist = []
    width, height = image.size
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE) and not resize:
        if width * height > max_pixels:
            raise UploadTooLarge(
                f"the image header claims {width}x{height} pixels, above the limit of "
                f"{max_pixels:,}"
            )
        raise InvalidImage(
            f"the image is {width}x{height}; the model takes {IMAGE_SIZE}x{IMAGE_SIZE}. "
            "Send a 32x32 image, or set resize=true to centre-crop and resize it"
        )
    if resize:
        try:
            image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # JPEG only; a no-op elsewhere
        except Exception as err:
            raise InvalidImage(f"the image is truncated or corrupt ({err})") from None
        if decoded_pixels(image) > max_pixels:
            raise UploadTooLarge(
                f"the image header claims {width}x{height} pixels, above the limit of "
                f"{max_pixels:,} when resizing"
            )
    return image


def decoded_pixels(image: Image.Image) -> int:
    width, height = image.size  # after draft(): the reduced size JPEG decodes to
    return width * height


def decode(image: Image.Image) -> np.ndarray:
    """Decode an image from `open_image`: the first frame, RGB, 32x32. One of another
    size is centre-cropped and resized (`open_image` has refused it already unless
    resizing was asked for): the one rule /predict, /explain and the score job share."""
    try:
        image.load()  # GIF and TIFF: the first frame
        image = to_rgb(image)
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = centre_crop_resize(image)
    except Exception as err:  # Pillow on damaged data: OSError mostly, but not only
        raise InvalidImage(f"the image is truncated or corrupt ({err})") from None
    return np.asarray(image, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from grayscale, palette, 16-bit, CMYK, and alpha (composited on white)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit grayscale: scale 0..65535 to 0..255 (Pillow's convert would clip at 255).
        wide = np.asarray(image, dtype=np.float64)
        top = 65535.0 if wide.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        image = Image.fromarray(np.clip(wide * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, WHITE)
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def centre_crop_resize(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    # reducing_gap: shrink by whole factors first (cheap box filter), then Lanczos over
    # the last 3x; a large photo costs a fraction of a full Lanczos pass, same picture.
    return image.resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0
    )


@functools.cache
def _malloc_trim():
    """glibc keeps freed memory of large decodes for reuse; malloc_trim hands it back."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_memory() -> None:
    """Return the heap's free memory to the OS, after a burst of large decodes."""
    if trim := _malloc_trim():
        trim(0)
