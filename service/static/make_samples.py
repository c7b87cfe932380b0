"""Draw the page's sample images: 32x32 PNGs of our own, not from CIFAR-100.

    python service/static/make_samples.py    # rewrites service/static/samples/*.png

Each is drawn at 8x and shrunk, so edges look like a small photo's, not like pixel art.
"""

from pathlib import Path

from PIL import Image, ImageDraw

SIZE, SCALE = 32, 8
S = SIZE * SCALE


def sky(top: tuple, bottom: tuple) -> Image.Image:
    image = Image.new("RGB", (S, S))
    draw = ImageDraw.Draw(image)
    for y in range(S):
        t = y / (S - 1)
        draw.line(
            [(0, y), (S, y)],
            fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)),
        )
    return image


def sun() -> Image.Image:
    image = sky((40, 110, 200), (150, 200, 240))
    draw = ImageDraw.Draw(image)
    c = S // 2
    for i in range(12):
        draw.regular_polygon((c, c, 110), 3, rotation=i * 10, fill=(250, 200, 60))
    draw.ellipse((c - 64, c - 64, c + 64, c + 64), fill=(255, 225, 70))
    return image


def tree() -> Image.Image:
    image = sky((120, 180, 235), (200, 225, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 200, S, S), fill=(70, 140, 50))
    draw.rectangle((112, 140, 144, 225), fill=(100, 65, 35))
    for box, shade in (((50, 40, 206, 170), 0), ((70, 20, 186, 120), 25), ((40, 90, 140, 175), 10)):
        draw.ellipse(box, fill=(30 + shade, 110 + shade, 40))
    return image


def boat() -> Image.Image:
    image = sky((170, 200, 230), (225, 235, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 170, S, S), fill=(30, 80, 140))
    for y in range(180, S, 16):
        draw.line([(0, y), (S, y + 4)], fill=(60, 110, 170), width=3)
    draw.polygon([(40, 160), (216, 160), (186, 200), (70, 200)], fill=(150, 40, 35))
    draw.rectangle((124, 40, 132, 160), fill=(60, 40, 30))
    draw.polygon([(136, 45), (136, 150), (210, 150)], fill=(245, 240, 225))
    draw.polygon([(120, 60), (120, 150), (60, 150)], fill=(230, 225, 205))
    return image


def apple() -> Image.Image:
    image = Image.new("RGB", (S, S), (235, 225, 205))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 190, 216, 236), fill=(200, 190, 170))  # shadow
    draw.ellipse((50, 62, 150, 222), fill=(190, 25, 30))
    draw.ellipse((106, 62, 206, 222), fill=(200, 30, 35))
    draw.ellipse((75, 90, 105, 130), fill=(235, 110, 100))  # highlight
    draw.line([(128, 70), (140, 30)], fill=(80, 50, 20), width=8)
    draw.ellipse((140, 25, 190, 55), fill=(70, 150, 50))
    return image


def house() -> Image.Image:
    image = sky((90, 150, 215), (180, 210, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 215, S, S), fill=(90, 150, 60))
    draw.rectangle((56, 120, 200, 220), fill=(225, 200, 150))
    draw.polygon([(40, 124), (128, 50), (216, 124)], fill=(150, 50, 40))
    draw.rectangle((112, 160, 144, 220), fill=(90, 60, 40))
    for x in (72, 160):
        draw.rectangle((x, 140, x + 26, 166), fill=(120, 170, 220))
    return image


def main() -> None:
    out = Path(__file__).resolve().parent / "samples"
    out.mkdir(exist_ok=True)
    for draw in (sun, tree, boat, apple, house):
        small = draw().resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        small.save(out / f"{draw.__name__}.png", optimize=True)


if __name__ == "__main__":
    main()
