"""Uploaded bytes -> the uint8 [32, 32, 3] RGB array the model takes.

Only decoding and colour conversion live here: scaling and every other numeric
preprocessing is inside the ONNX graph.
"""

import io

import numpy as np
from PIL import Image

from service.errors import InvalidImage, UploadTooLarge
from service.modelcard import IMAGE_SIZE

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
WHITE = (255, 255, 255, 255)


def decode_image(data: bytes, resize: bool, max_pixels: int) -> np.ndarray:
    """Decode one image; InvalidImage or UploadTooLarge with a message a user can act on."""
    if not data:
        raise InvalidImage("the file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as err:  # claims more pixels than Pillow allows
        raise UploadTooLarge(f"the image header claims too many pixels: {err}") from None
    except Exception:  # UnidentifiedImageError mostly; hostile headers can raise others
        raise InvalidImage(f"not an image we can read; send {', '.join(FORMATS)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise UploadTooLarge(
            f"the image header claims {width}x{height} pixels, above the limit of {max_pixels:,}"
        )
    if (width, height) != (IMAGE_SIZE, IMAGE_SIZE) and not resize:
        raise InvalidImage(
            f"the image is {width}x{height}; the model takes {IMAGE_SIZE}x{IMAGE_SIZE}. "
            "Send a 32x32 image, or set resize=true to centre-crop and resize it"
        )
    try:
        if resize:
            image.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # lets JPEG decode at reduced scale
        image.load()  # GIF and TIFF: the first frame
        image = to_rgb(image)
        if resize:
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
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS, box=box)
