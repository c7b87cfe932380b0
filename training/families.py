"""Families of images that are not CIFAR-like, generated, for measuring familiarity scores
(`python -m training ood`). Each family is a function (count, rng, photos) -> uint8
[count, 32, 32, 3]; `photos` are real test photos of the classes the model learnt, for the
families made from photographs (zoomed into, shrunk, washed out). Nothing is downloaded:
every image is drawn here from a seeded generator, so a rerun measures the same images.
"""

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

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

    def one(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
        x0, y0, x1, y1 = box
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse(box, fill=_colour(rng))
        elif kind == 1:
            draw.rectangle(box, fill=_colour(rng))
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=_colour(rng))

    return _boxes(count, rng, one)


def _boxes(
    count: int, rng: np.random.Generator, draw_one: Callable[[ImageDraw.ImageDraw, tuple], None]
) -> np.ndarray:
    """`count` flat-coloured images, each with one to four random boxes, each drawn by
    `draw_one(draw, box)` (which may draw more from `rng`)."""
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        image = Image.new("RGB", (SIZE, SIZE), _colour(rng))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.integers(0, SIZE - 8, 2)
            x1, y1 = x0 + rng.integers(6, SIZE - x0 + 1), y0 + rng.integers(6, SIZE - y0 + 1)
            draw_one(draw, (x0, y0, x1, y1))
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


def salt_and_pepper(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Mid-grey with a random 5 to 40 % of its pixels set to black or white."""
    out = np.full((count, SIZE, SIZE, 3), 128, np.uint8)
    share = rng.uniform(0.05, 0.4, (count, 1, 1))
    hit = rng.random((count, SIZE, SIZE)) < share
    value = np.where(rng.random((count, SIZE, SIZE)) < 0.5, 0, 255).astype(np.uint8)
    out[hit] = value[hit][:, None]
    return out


def blocky_noise(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Uniform noise in blocks of 2 to 8 pixels: coarse, with flat runs between edges."""
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        side = int(rng.choice([2, 4, 8]))
        cells = rng.integers(0, 256, (SIZE // side, SIZE // side, 3), dtype=np.uint8)
        out[i] = np.repeat(np.repeat(cells, side, 0), side, 1)
    return out


def flat_grey(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """One random grey level over the whole image (black and white included)."""
    levels = rng.integers(0, 256, (count, 1, 1, 1), dtype=np.uint8)
    return np.broadcast_to(levels, (count, SIZE, SIZE, 3)).copy()


def two_flat_colours(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Two random flat colours either side of one straight edge at a random angle."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE - 0.5
    angle = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    offset = rng.uniform(-0.3, 0.3, (count, 1, 1))
    side = (x * np.cos(angle) + y * np.sin(angle) > offset)[..., None]
    low, high = rng.integers(0, 256, (2, count, 1, 1, 3))
    return np.where(side, high, low).astype(np.uint8)


def linear_gradients(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """A smooth ramp between two random colours in a random direction."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    angle = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    ramp = x * np.cos(angle) + y * np.sin(angle)
    ramp = (ramp - ramp.min(axis=(1, 2), keepdims=True)) / np.ptp(ramp, axis=(1, 2), keepdims=True)
    low, high = rng.uniform(0, 255, (2, count, 1, 1, 3))
    return _clip(low + (high - low) * ramp[..., None])


def radial_gradients(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """A smooth ramp out from a random centre, between two random colours."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    cy, cx = rng.uniform(0, 1, (2, count, 1, 1))
    radius = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    radius = radius / radius.max(axis=(1, 2), keepdims=True)
    low, high = rng.uniform(0, 255, (2, count, 1, 1, 3))
    return _clip(low + (high - low) * radius[..., None])


def stripes(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Hard-edged bars 1 to 6 pixels wide, horizontal or vertical, in two random colours."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    width = rng.integers(1, 7, (count, 1, 1))
    across = np.where(rng.random((count, 1, 1)) < 0.5, x, y)
    bars = ((across // width) % 2)[..., None]
    low, high = rng.integers(0, 256, (2, count, 1, 1, 3))
    return np.where(bars == 1, high, low).astype(np.uint8)


def dot_grids(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Square dots of 1 to 3 pixels on a regular grid 4 to 8 pixels apart."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pitch = rng.integers(4, 9, (count, 1, 1))
    dot = rng.integers(1, 4, (count, 1, 1))
    on = (((x % pitch) < dot) & ((y % pitch) < dot))[..., None]
    low, high = rng.integers(0, 256, (2, count, 1, 1, 3))
    return np.where(on, high, low).astype(np.uint8)


def outlined_shapes(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """One to four ellipse or rectangle outlines, 1 to 2 pixels wide, on a flat colour."""

    def one(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
        width = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            draw.ellipse(box, outline=_colour(rng), width=width)
        else:
            draw.rectangle(box, outline=_colour(rng), width=width)

    return _boxes(count, rng, one)


def coloured_text(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Three lines of random digits and capitals, in a random ink on a random paper."""
    font = ImageFont.load_default()
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        image = Image.new("RGB", (SIZE, SIZE), _colour(rng))
        draw = ImageDraw.Draw(image)
        ink = _colour(rng)
        for line in range(3):
            word = "".join(rng.choice(alphabet, 6))
            draw.text((int(rng.integers(-2, 3)), 10 * line), word, fill=ink, font=font)
        out[i] = np.asarray(image)
    return out


def blurred_photos(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Real photos blurred (Gaussian, radius 1.5 to 3 pixels): the object's outline is
    there, its texture gone."""
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        photo = Image.fromarray(photos[rng.integers(0, len(photos))])
        out[i] = np.asarray(photo.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3))))
    return out


def shuffled_photos(count: int, rng: np.random.Generator, photos: np.ndarray) -> np.ndarray:
    """Real photos cut into 8x8 tiles, the tiles shuffled: a photo's colours and textures,
    no object."""
    tiles = SIZE // 8
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        photo = photos[rng.integers(0, len(photos))]
        cut = photo.reshape(tiles, 8, tiles, 8, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 8, 8, 3)
        cut = cut[rng.permutation(len(cut))].reshape(tiles, tiles, 8, 8, 3)
        out[i] = cut.transpose(0, 2, 1, 3, 4).reshape(SIZE, SIZE, 3)
    return out


# Each family's kind: `python -m training ood` chooses a score on half the families of
# every kind and judges it on the other half, so that no kind is only chosen on or only
# judged on.
KINDS: dict[str, dict[str, Family]] = {
    "noise": {
        "uniform noise": uniform_noise,
        "Gaussian noise": gaussian_noise,
        "low-contrast noise": low_contrast_noise,
        "salt-and-pepper noise": salt_and_pepper,
        "blocky noise": blocky_noise,
    },
    "flat": {
        "flat colour": flat_colour,
        "flat grey": flat_grey,
        "two flat colours": two_flat_colours,
    },
    "gradient": {"linear gradients": linear_gradients, "radial gradients": radial_gradients},
    "pattern": {
        "gratings": gratings,
        "checkerboards": checkerboards,
        "stripes": stripes,
        "dot grids": dot_grids,
    },
    "text": {"text": text, "coloured text": coloured_text},
    "shapes": {"shapes": shapes, "outlined shapes": outlined_shapes},
    "photo-made": {
        "washed-out photos": washed_out_photos,
        "zoomed patches": zoomed_patches,
        "mosaics": mosaics,
        "blurred photos": blurred_photos,
        "shuffled photos": shuffled_photos,
    },
}
FAMILIES: dict[str, Family] = {name: f for kind in KINDS.values() for name, f in kind.items()}
KIND_OF: dict[str, str] = {name: kind for kind, named in KINDS.items() for name in named}


def generate(count: int, seed: int, photos: np.ndarray) -> dict[str, np.ndarray]:
    """`count` images of every family, each family from its own seeded stream (named by
    the family, so adding a family changes no other family's images)."""
    return {
        name: family(count, np.random.default_rng([seed, *name.encode()]), photos)
        for name, family in FAMILIES.items()
    }


def split(seed: int) -> tuple[list[str], list[str]]:
    """Two halves of the families, each holding about half of every kind (the odd one of a
    kind alternating between halves), shuffled by `seed`: (choosing, judging)."""
    rng = np.random.default_rng([seed, 7])
    halves: tuple[list[str], list[str]] = ([], [])
    extra = 0
    for kind in KINDS.values():
        names = [list(kind)[i] for i in rng.permutation(len(kind))]
        cut = len(names) // 2 + (len(names) % 2) * extra
        extra ^= len(names) % 2
        halves[0].extend(names[:cut])
        halves[1].extend(names[cut:])
    return halves


def _clip(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))
