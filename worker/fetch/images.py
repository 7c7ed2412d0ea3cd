"""Fetch an image from an untrusted URL and decode it into one safe RGB picture.

    fetch_image(url, policy)  =  decode_image(fetch_bytes(url, policy), policy)

``fetch_bytes`` speaks http, https (via :mod:`worker.fetch.download`, which connects only to
addresses vetted by :mod:`worker.fetch.netguard`) and ``s3://bucket/key`` for buckets the policy
lists. ``decode_image`` trusts nothing the server said: the format comes from the magic
bytes, only an allow-list of formats reaches Pillow, the pixel count is checked from the
header before any pixel is decoded, and only the first frame of an animation is decoded.
With a prescaler on the policy (``VQA_IMAGE_PRESCALE``, worker/prescale.py) a photo larger than
the model will use is decoded at reduced scale and resized to the processor's target, after the
same checks on its full size.

Every refusal is a :class:`producer.errors.ImageRejected` (permanent) or a transient error
with one of these codes:

    bad_scheme             not http/https/s3, or s3 without a client on this worker
    bad_url                malformed URL, whitespace/backslash in it, bad host or port
    unknown_host           DNS says the host does not exist
    blocked_address        host resolves to an internal address; s3 bucket not allowed
    too_many_redirects     more than ``max_redirects`` hops
    http_status            4xx (permanent); 5xx, 408, 429 raise UpstreamUnavailable;
                           S3 4xx such as NoSuchKey / AccessDenied
    tls_error              the certificate does not verify for the host name
    too_large              body or Content-Length above ``max_bytes``
    not_an_image           empty body, HTML, text, unknown bytes
    unsupported_format     a recognised format outside ``allowed_formats`` (SVG, PDF, EPS...)
    image_too_many_pixels  header dimensions above ``max_pixels`` (decompression bombs)
    corrupt_image          a recognised format Pillow cannot decode (truncated, damaged)
    timeout                (FetchTimeout) connect or total deadline passed
    connection_failed      (UpstreamUnavailable) refused, reset, DNS temporarily failing
    storage_unavailable    (StorageUnavailable) S3 5xx, throttling, unreachable endpoint
    out_of_memory          (OutOfMemory) MemoryError while decoding an image within the caps
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image, ImageOps

from producer.errors import ImageRejected, OutOfMemory, VQAError
from worker.fetch import download
from worker.fetch.kept import KeptConnections
from worker.fetch.netguard import HostRules

if TYPE_CHECKING:
    from producer.settings import Settings
    from worker.prescale import Prescaler


# Formats an operator may enable. Vector and page formats (SVG, PDF, EPS/PostScript) are
# absent on purpose: decoding them runs an interpreter (Ghostscript for EPS).
ENABLEABLE_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
# TIFF stays off by default: libtiff's many codecs are a large surface VQA users rarely need.
DEFAULT_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP"})


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and exceptions for fetching and decoding user-supplied images."""

    allowed_hosts: tuple[str, ...] = ()
    connect_timeout_s: float = 5.0
    total_timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_redirects: int = 5
    allowed_formats: frozenset[str] = DEFAULT_FORMATS
    allowed_s3_buckets: frozenset[str] = frozenset()
    # CA bundle for https; None uses the system trust store.
    ca_bundle: str | None = None
    user_agent: str = "vqa-worker/0.1"
    # VQA_IMAGE_PRESCALE (worker/prescale.py): decode no larger than the model will use; None = full size.
    prescale: Prescaler | None = field(default=None, compare=False)
    # VQA_FETCH_KEEPALIVE_S (worker/fetch/kept.py): image-host connections kept between fetches; None = one per fetch.
    connections: KeptConnections | None = field(default=None, compare=False)
    host_rules: HostRules = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Accept any iterables from callers, but store hashable, immutable values.
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        object.__setattr__(self, "allowed_formats", frozenset(f.upper() for f in self.allowed_formats))
        object.__setattr__(self, "allowed_s3_buckets", frozenset(self.allowed_s3_buckets))
        if self.connect_timeout_s <= 0 or self.total_timeout_s <= 0:
            raise ValueError("fetch timeouts must be positive")
        if self.max_bytes < 1 or self.max_pixels < 1 or self.max_redirects < 0:
            raise ValueError("max_bytes and max_pixels must be positive, max_redirects not negative")
        refused = self.allowed_formats - ENABLEABLE_FORMATS
        if refused:
            raise ValueError(f"image formats {sorted(refused)} cannot be enabled; choose from {sorted(ENABLEABLE_FORMATS)}")
        object.__setattr__(self, "host_rules", HostRules(self.allowed_hosts))

    @classmethod
    def from_settings(cls, settings: Settings, *, prescale: Prescaler | None = None) -> FetchPolicy:
        return cls(
            prescale=prescale if settings.image_prescale else None,
            allowed_hosts=tuple(settings.allowed_hosts),
            connect_timeout_s=settings.fetch_connect_timeout_s,
            total_timeout_s=settings.fetch_timeout_s,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_redirects=settings.fetch_max_redirects,
            allowed_formats=frozenset(settings.image_formats),
            allowed_s3_buckets=frozenset(settings.image_s3_buckets),
            ca_bundle=settings.fetch_ca_bundle,
            connections=KeptConnections(idle_s=settings.fetch_keepalive_s, per_key=settings.fetch_concurrency,
                                        most=4 * settings.fetch_concurrency) if settings.fetch_keepalive_s > 0 else None,
        )


def fetch_image(url: str, policy: FetchPolicy, *, s3_client: Any = None, image_grid: str | None = None) -> Image.Image:
    """Fetch ``url`` and return its first frame as an upright RGB image (prescaled for the job's ``image_grid``)."""
    return decode_image(fetch_bytes(url, policy, s3_client=s3_client), policy, image_grid=image_grid)


def fetch_bytes(url: str, policy: FetchPolicy, *, s3_client: Any = None) -> bytes:
    """Fetch the raw bytes behind ``url`` within the policy's deadline and byte cap."""
    deadline = time.monotonic() + policy.total_timeout_s
    if url[:5].lower() == "s3://":
        return download.fetch_s3(url, policy, s3_client=s3_client, deadline=deadline)
    return download.fetch_http(url, policy, deadline=deadline)


# --------------------------------------------------------------------------- decoding


def sniff_format(data: bytes) -> str | None:
    """Name the format from the magic bytes (Pillow's names), or None when it is no image we know."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    # "BM" alone is two letters of text; require a known DIB header size too.
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "HEIF"
    text = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<") and b"<svg" in text:
        return "SVG"
    return None


# Recognised only to say precisely what was refused.
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
)


def decode_image(data: bytes, policy: FetchPolicy, *, image_grid: str | None = None) -> Image.Image:
    """Decode ``data`` into an upright RGB image (first frame only), or raise ImageRejected.

    ``image_grid`` is the job's own detail request (None: the worker's ``VQA_IMAGE_GRID``): with
    a prescaler on the policy, the image is decoded no larger than that grid will use.
    """
    # Outside the decode's error translation: a bad grid is the caller's error, not a corrupt image.
    prescale = None if policy.prescale is None else policy.prescale.for_grid(image_grid)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(_not_an_image(data, policy), code="not_an_image")
    if fmt not in policy.allowed_formats:
        raise ImageRejected(
            f"{fmt} images are not accepted; send one of {_format_list(policy)}", code="unsupported_format"
        )
    try:
        return _decode(data, fmt, policy, prescale)
    except VQAError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(
            f"the {fmt} image has more than {policy.max_pixels:,} pixels; resize it and try again",
            code="image_too_many_pixels",
        ) from exc
    except MemoryError as exc:
        raise OutOfMemory(f"ran out of memory decoding a {fmt} image") from exc
    except _PILLOW_ERRORS as exc:
        raise ImageRejected(
            f"the {fmt} image is truncated or corrupt ({_pillow_reason(exc)}); re-export or re-upload the original",
            code="corrupt_image",
        ) from exc


# What Pillow's parsers and decoders raise on hostile bytes. The fuzz tests see OSError
# (UnidentifiedImageError, truncation), ValueError and SyntaxError; the rest are raised by
# plugin code paths Image.open itself guards against, kept so load() cannot leak them.
_PILLOW_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    struct.error,
)


def _decode(data: bytes, fmt: str, policy: FetchPolicy, prescale: Prescaler | None) -> Image.Image:
    # formats=[fmt]: only the plugin the magic bytes chose may parse the data.
    with Image.open(io.BytesIO(data), formats=[fmt]) as image:
        width, height = image.size
        # The header is parsed, no pixel decoded yet: bombs stop here, before allocation.
        # Pillow's own MAX_IMAGE_PIXELS is a process-wide knob anyone may change.
        if width * height > policy.max_pixels:
            raise ImageRejected(
                f"the {fmt} image is {width}x{height} = {width * height:,} pixels; the limit is "
                f"{policy.max_pixels:,}; resize it and try again",
                code="image_too_many_pixels",
            )
        target = _prescale_target(image, prescale)
        if target is not None and fmt == "JPEG":
            # The smallest of 1/2, 1/4, 1/8 that is still at least the target, in stored orientation.
            image.draft("RGB", target[::-1] if _swaps_axes(image) else target)
        image.load()  # the current frame only: frame 0 of an animation
        upright = ImageOps.exif_transpose(image)
    rgb = _to_rgb(upright)
    if target is not None and rgb.size != target:
        rgb = rgb.resize(target, prescale.resample)  # type: ignore[union-attr]
    return rgb


def _swaps_axes(image: Image.Image) -> bool:
    # EXIF orientations 5-8 are transposed or rotated by 90 degrees: width and height trade places.
    return image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def _pillow_reason(exc: Exception) -> str:
    # Pillow names the buffer it read ("cannot identify image file <_io.BytesIO object at 0x7f...>"):
    # an address that says nothing to the submitter and makes one image's error differ per attempt.
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))[:200]


def _prescale_target(image: Image.Image, prescale: Prescaler | None) -> tuple[int, int] | None:
    if prescale is None:
        return None
    width, height = image.size
    return prescale.target(*((height, width) if _swaps_axes(image) else (width, height)))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale: a plain convert clips everything above 255 to white.
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Flatten onto white: whatever colour hides under transparent pixels is noise.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def install_pillow_warning_filter() -> None:
    """Silence Pillow's warnings about the images it decodes, process-wide; the worker calls it once at start.

    They describe the untrusted image (corrupt EXIF, a malformed MPO, a decompression-bomb
    hint), not our code, and the outcome is already decided by our own checks (the pixel cap
    before decoding, a typed error otherwise). A filter installed once costs nothing per image;
    the alternative, ``warnings.catch_warnings`` around each decode, swaps process-wide state
    and so had to hold a lock that let one image decode at a time across the fetch pool.
    """
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _format_list(policy: FetchPolicy) -> str:
    return ", ".join(sorted(policy.allowed_formats))


def _not_an_image(data: bytes, policy: FetchPolicy) -> str:
    if not data:
        what = "an empty body"
    else:
        text = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
            what = "an HTML page"
        elif text.startswith((b"{", b"[")):
            what = "JSON or text"
        else:
            what = f"{len(data):,} bytes of an unknown format"
    return f"the URL returned {what}, not an image; link directly to a {_format_list(policy)} file"
