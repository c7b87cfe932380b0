"""The pictures made of test images: captioned rows and grids (Pillow), written as PNG files.

A page shows which images a number is about (the worst classes, the confused pairs, the label
candidates, the twins); the plots of the numbers themselves are in figures.py.
"""

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.atomic import write_bytes
from training.data import Cifar100
from training.report.sentences import pct


def draw(report: dict, probabilities: np.ndarray, data: Cifar100, out: Path) -> None:
    """One model's montages into `out`; `probabilities` are its scores on data.test."""
    test = data.test
    index = {name: i for i, name in enumerate(data.class_names)}
    predicted = probabilities.argmax(axis=1)

    mean_colours = np.asarray(report["dataset"]["mean_colour_per_class"], dtype=np.uint8)
    swatches = [
        (np.full((32, 32, 3), colour, dtype=np.uint8), name)
        for colour, name in zip(mean_colours, data.class_names, strict=True)
    ]
    save_image(tiles(swatches, columns=10, scale=2), out / "mean_colours.png")

    for group in ("best_classes", "worst_classes"):
        class_rows = [
            (
                f"{name}\n{pct(report['per_class_accuracy'][name])} right",
                test.images[test.fine == index[name]][:6],
            )
            for name in report[group]
        ]
        save_image(captioned_rows(class_rows), out / f"{group}.png")
    confused_rows = []
    for pair in report["most_confused_pairs"]:
        hits = (test.fine == index[pair["true"]]) & (predicted == index[pair["predicted"]])
        caption = f"{pair['true']}\n  taken for {pair['predicted']} ({pair['count']}x)"
        confused_rows.append((caption, test.images[hits][:6]))
    save_image(captioned_rows(confused_rows), out / "confused_pairs.png")

    candidates = [
        (
            test.images[c["index"]],
            f"#{c['index']}\ngiven: {c['given']}\nmodel: {c['suggested']}\n"
            f"p(given) {c['given_probability']:.2f}",
        )
        for c in report["label_issues"]["candidates"]
    ]
    save_image(tiles(candidates), out / "label_issues.png")
    unsure = [
        (
            test.images[u["index"]],
            f"#{u['index']}\ntrue: {u['true']}\nmodel: {u['predicted']}\n"
            f"{u['entropy_bits']:.2f} bits",
        )
        for u in report["uncertainty"]["most_uncertain"]
    ]
    save_image(tiles(unsure), out / "uncertain.png")

    # Duplicate pairs point into the official training file: our train split + validation.
    train_images = np.concatenate([data.train.images, data.val.images])
    twin_rows = [
        (
            f"test #{p['test']} ({p['test_label']})\ntrain #{p['train']} ({p['train_label']})\n"
            + (f"RMS {p['rms']:.1f}" if "rms" in p else "exact"),
            np.stack([test.images[p["test"]], train_images[p["train"]]]),
        )
        for p in report["dataset"]["duplicate_pairs"][:10]
    ]
    if twin_rows:
        save_image(captioned_rows(twin_rows, columns=2), out / "duplicates.png")


def captioned_rows(
    rows: list[tuple[str, np.ndarray]], columns: int = 6, scale: int = 2
) -> Image.Image:
    """One row per entry: its caption on the left, then up to `columns` images."""
    size, label = 32 * scale + 4, 170
    canvas = Image.new("RGB", (label + columns * size, max(len(rows), 1) * size), "white")
    pen = ImageDraw.Draw(canvas)
    for r, (caption, images) in enumerate(rows):
        pen.multiline_text((6, r * size + 8), caption, fill="black", font=font(), spacing=3)
        for c, image in enumerate(images[:columns]):
            big = Image.fromarray(image).resize((32 * scale, 32 * scale), Image.Resampling.NEAREST)
            canvas.paste(big, (label + c * size + 2, r * size + 2))
        if r:
            pen.line([(0, r * size), (canvas.width, r * size)], fill="#dddddd")
    return canvas


def tiles(items: list[tuple[np.ndarray, str]], columns: int = 5, scale: int = 3) -> Image.Image:
    """A grid of images, each with its caption underneath."""
    lines = max((caption.count("\n") + 1 for _, caption in items), default=1)
    width, height = max(32 * scale, 96) + 40, 32 * scale + 8 + 14 * lines
    rows = max((len(items) + columns - 1) // columns, 1)
    canvas = Image.new("RGB", (columns * width, rows * height), "white")
    pen = ImageDraw.Draw(canvas)
    for n, (image, caption) in enumerate(items):
        left, top = (n % columns) * width, (n // columns) * height
        big = Image.fromarray(image).resize((32 * scale, 32 * scale), Image.Resampling.NEAREST)
        canvas.paste(big, (left + 4, top + 4))
        pen.multiline_text(
            (left + 4, top + 32 * scale + 6), caption, fill="black", font=font(10), spacing=2
        )
    return canvas


def font(size: int = 11) -> ImageFont.FreeTypeFont:
    # Pillow's bundled font: the same glyphs on every machine, so the same PNG bytes.
    return ImageFont.load_default(size=size)


def save_image(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    write_bytes(path, buffer.getvalue())
