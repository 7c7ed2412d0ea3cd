"""Sample images of different sizes and aspect ratios, drawn deterministically."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

# name -> (width, height): small, wide, tall, square, tiny, large-ish
SIZES = {
    "small.png": (40, 30),
    "wide.jpg": (300, 120),
    "tall.png": (64, 256),
    "square.jpg": (500, 500),
    "tiny.png": (8, 8),
    "landscape.jpg": (640, 360),
}


def write_sample_images(directory: Path) -> dict[str, Path]:
    paths = {}
    for index, (name, (width, height)) in enumerate(sorted(SIZES.items())):
        image = Image.new("RGB", (width, height), (20 * index, 255 - 30 * index, 90))
        draw = ImageDraw.Draw(image)
        draw.rectangle([width // 4, height // 4, width // 2, height // 2], fill=(250, 200, 10))
        draw.ellipse([width // 2, height // 3, width - 1, height - 1], outline=(0, 0, 255))
        path = directory / name
        image.save(path)
        paths[name] = path
    return paths
