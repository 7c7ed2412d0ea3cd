"""Image files as bytes for the decoder's tests: every allowed format, odd modes, and bombs.

Bombs are written by hand (a PNG header, a GIF screen descriptor) so a 50,000 x 50,000 image
costs a few dozen bytes to build and nothing to hold.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from PIL import Image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def solid(fmt: str, size: tuple[int, int] = (24, 16), color: tuple[int, int, int] = RED, **params: Any) -> bytes:
    return encode(Image.new("RGB", size, color), fmt, **params)


def gradient(size: tuple[int, int] = (64, 48)) -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata([((x * 4) % 256, (y * 5) % 256, (x * y) % 256) for y in range(size[1]) for x in range(size[0])])
    return image


def halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue: shows which way a rotation went."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


def jpeg_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(halves(), "JPEG", quality=95, exif=exif.tobytes())


def jpeg_with_corrupt_exif() -> bytes:
    # An Orientation tag whose data lies past the end of the block: Pillow warns and skips it.
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1000, 0xFFFF) + b"\x00" * 4
    return encode(Image.new("RGB", (8, 8), GREEN), "JPEG", exif=b"Exif\x00\x00" + tiff)


def animated(fmt: str, colors: tuple[tuple[int, int, int], ...] = (RED, GREEN, BLUE), size: tuple[int, int] = (8, 8)) -> bytes:
    frames = [Image.new("RGB", size, color) for color in colors]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_bomb(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels, with one row of real data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 1024)))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# One 1x1 frame (index 0) with a graphic control extension; LZW data "02 02 44 01 00".
_GIF_FRAME = b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00" + b"\x02\x02\x44\x01\x00"


def gif(width: int, height: int, *, frames: int = 1) -> bytes:
    """A GIF with a ``width`` x ``height`` logical screen and ``frames`` 1x1 frames."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(RED) + bytes(BLUE)
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    return screen + loop + _GIF_FRAME * frames + b"\x3b"


def fuzz_seeds() -> dict[str, bytes]:
    """Small valid files in every allowed format and the modes they carry."""
    rgba = Image.new("RGBA", (16, 12), (10, 200, 30, 128))
    palette = gradient((16, 12)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    return {
        "png-rgb": encode(gradient((16, 12)), "PNG"),
        "png-rgba": encode(rgba, "PNG"),
        "png-palette-trns": encode(palette, "PNG"),
        "png-16bit": encode(Image.new("I;16", (8, 8), 40000), "PNG"),
        "png-1bit": encode(Image.new("1", (9, 7), 1), "PNG"),
        "apng": animated("PNG"),
        "jpeg": encode(gradient((24, 16)), "JPEG", quality=80),
        "jpeg-exif-rotated": jpeg_with_orientation(6),
        "jpeg-progressive": encode(gradient((96, 64)), "JPEG", quality=85, progressive=True, subsampling=2),
        "jpeg-cmyk": encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
        "gif-animated": animated("GIF"),
        "gif-handmade": gif(4, 4, frames=3),
        "webp-lossy": encode(gradient((16, 12)), "WEBP", quality=70),
        "webp-lossless": encode(rgba, "WEBP", lossless=True),
        "webp-animated": animated("WEBP"),
        "gif-interlaced": encode(gradient((40, 30)).convert("P"), "GIF", interlace=True),
        "bmp": encode(gradient((10, 6)), "BMP"),
        "bmp-palette": encode(palette.convert("RGB").convert("P"), "BMP"),
    }
