"""Families of images that are not CIFAR-like, generated, for measuring familiarity scores
(`python -m training ood`). Each family is a function (count, rng, photos) -> uint8
[count, 32, 32, 3]; `photos` are real test photos of the classes the model learnt, for the
families made from photographs (zoomed into, shrunk, washed out). Nothing is downloaded:
every image is drawn here from a seeded generator, so a rerun measures the same images.
"""

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 32
Family = Callable[[int, np.random.Generator, np.ndarray], np.ndarray]


def uniform_noise(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Every pixel and channel uniform on 0-255."""
    return rng.integers(0, 256, (count, SIZE, SIZE, 3), dtype=np.uint8)


def gaussian_noise(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Mid-grey plus Gaussian noise, standard deviation 50, clipped."""
    return _clip(128 + rng.normal(0, 50, (count, SIZE, SIZE, 3)))


def low_contrast_noise(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """A random flat colour plus faint Gaussian noise (standard deviation 4): the images
    the Mahalanobis score rated more familiar than real photos."""
    base = rng.uniform(40, 215, (count, 1, 1, 3))
    return _clip(base + rng.normal(0, 4, (count, SIZE, SIZE, 3)))


def flat_colour(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """One random colour over the whole image."""
    return np.broadcast_to(
        rng.integers(0, 256, (count, 1, 1, 3), dtype=np.uint8), (count, SIZE, SIZE, 3)
    ).copy()


def washed_out_photos(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Real photos with their contrast cut to 10 % around their own mean: the object is
    still there, barely."""
    chosen = photos[rng.integers(0, len(photos), count)].astype(np.float64)
    mean = chosen.mean(axis=(1, 2, 3), keepdims=True)
    return _clip(mean + 0.1 * (chosen - mean))


def gratings(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Sinusoidal stripes (a texture): random orientation, 1 to 8 cycles across, between
    two random colours."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    angle = rng.uniform(0, np.pi, (count, 1, 1))
    cycles = rng.uniform(1, 8, (count, 1, 1))
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)))
    low, high = rng.uniform(0, 255, (2, count, 1, 1, 3))
    return _clip(low + (high - low) * wave[..., None])


def checkerboards(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Two random colours in squares 2 to 8 pixels wide."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    side = rng.integers(2, 9, (count, 1, 1))
    cells = ((x // side + y // side) % 2)[..., None]
    low, high = rng.integers(0, 256, (2, count, 1, 1, 3))
    return np.where(cells == 1, high, low).astype(np.uint8)


def shapes(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """One to four filled ellipses, rectangles or triangles in random colours on a flat
    background: rendered, not photographed."""
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        image = Image.new("RGB", (SIZE, SIZE), _colour(rng))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.integers(0, SIZE - 8, 2)
            x1, y1 = x0 + rng.integers(6, SIZE - x0 + 1), y0 + rng.integers(6, SIZE - y0 + 1)
            kind = rng.integers(0, 3)
            if kind == 0:
                draw.ellipse((x0, y0, x1, y1), fill=_colour(rng))
            elif kind == 1:
                draw.rectangle((x0, y0, x1, y1), fill=_colour(rng))
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=_colour(rng))
        out[i] = np.asarray(image)
    return out


def text(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Two lines of random letters and digits in Pillow's built-in font, dark on light or
    light on dark."""
    font = ImageFont.load_default()
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"))
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        paper, ink = (230, 20) if rng.random() < 0.5 else (20, 230)
        image = Image.new("RGB", (SIZE, SIZE), (paper,) * 3)
        draw = ImageDraw.Draw(image)
        for line in range(2):
            word = "".join(rng.choice(alphabet, 5))
            draw.text((int(rng.integers(0, 4)), 2 + 15 * line), word, fill=(ink,) * 3, font=font)
        out[i] = np.asarray(image)
    return out


def zoomed_patches(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """An 8x8 to 14x14 corner-to-corner patch of a real photo, enlarged to 32x32 (bicubic):
    a photograph, but not of a whole object."""
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        side = int(rng.integers(8, 15))
        x, y = rng.integers(0, SIZE - side + 1, 2)
        patch = photos[rng.integers(0, len(photos))][y : y + side, x : x + side]
        out[i] = np.asarray(Image.fromarray(patch).resize((SIZE, SIZE), Image.BICUBIC))
    return out


def mosaics(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Four real photos tiled 2x2 into 64x64 and shrunk to 32x32 (Lanczos): an image shrunk
    from a larger one, holding four small objects instead of one."""
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        four = photos[rng.integers(0, len(photos), 4)]
        big = np.concatenate([np.concatenate(four[:2], 1), np.concatenate(four[2:], 1)], 0)
        out[i] = np.asarray(Image.fromarray(big).resize((SIZE, SIZE), Image.LANCZOS))
    return out


FAMILIES: dict[str, Family] = {
    "uniform noise": uniform_noise,
    "Gaussian noise": gaussian_noise,
    "low-contrast noise": low_contrast_noise,
    "flat colour": flat_colour,
    "washed-out photos": washed_out_photos,
    "gratings": gratings,
    "checkerboards": checkerboards,
    "shapes": shapes,
    "text": text,
    "zoomed patches": zoomed_patches,
    "mosaics": mosaics,
}


def generate(count: int, seed: int, photos: np.ndarray) -> dict[str, np.ndarray]:
    """`count` images of every family, each family from its own seeded stream."""
    return {
        name: family(count, np.random.default_rng([seed, index]), photos)
        for index, (name, family) in enumerate(FAMILIES.items())
    }


def _clip(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))
