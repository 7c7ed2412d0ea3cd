"""Decoding, address vetting and S3 fetching, without an HTTP server (see test_fetch_http.py)."""

from __future__ import annotations

import io
import ipaddress
import logging
import threading
import time
import warnings
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.response import StreamingBody
from botocore.stub import Stubber
from PIL import Image

from producer.errors import ImageRejected, StorageUnavailable, VQAError
from producer.settings import Settings
from tests.support.image_bytes import (
    BLUE,
    GREEN,
    RED,
    animated,
    encode,
    gif,
    gradient,
    jpeg_with_corrupt_exif,
    jpeg_with_orientation,
    png_header_bomb,
    solid,
)
from worker.fetch import netguard
from worker.fetch.images import DEFAULT_FORMATS, FetchPolicy, decode_image, fetch_bytes, install_pillow_warning_filter, sniff_format
from worker.fetch.netguard import HostRules

pytestmark = pytest.mark.timeout(30)
POLICY = FetchPolicy()


def rejected(data: bytes, policy: FetchPolicy = POLICY) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, policy)
    return caught.value


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --------------------------------------------------------------------------- policy


def test_policy_defaults_are_safe() -> None:
    assert POLICY.allowed_formats == DEFAULT_FORMATS == {"JPEG", "PNG", "GIF", "WEBP", "BMP"}
    assert POLICY.max_redirects == 5
    assert not POLICY.allowed_s3_buckets


def test_policy_from_settings() -> None:
    settings = Settings(
        allowed_hosts=["localhost", "10.0.0.0/8"],
        fetch_timeout_s=3,
        fetch_connect_timeout_s=1,
        fetch_max_redirects=2,
        max_image_bytes=4096,
        max_image_pixels=1000,
        image_formats=["png", "JPEG"],
        image_s3_buckets=["images"],
    )
    policy = FetchPolicy.from_settings(settings)
    assert policy.allowed_hosts == ("localhost", "10.0.0.0/8")
    assert (policy.total_timeout_s, policy.connect_timeout_s, policy.max_redirects) == (3, 1, 2)
    assert (policy.max_bytes, policy.max_pixels) == (4096, 1000)
    assert policy.allowed_formats == {"PNG", "JPEG"}
    assert policy.allowed_s3_buckets == {"images"}
    assert FetchPolicy.from_settings(Settings()) == FetchPolicy()


@pytest.mark.parametrize(
    "options",
    [
        {"allowed_formats": {"PNG", "EPS"}},
        {"allowed_formats": {"SVG"}},
        {"allowed_formats": {"PDF"}},
        {"total_timeout_s": 0},
        {"max_bytes": 0},
        {"max_redirects": -1},
        {"allowed_hosts": ("10.0.0.0/33",)},
        {"allowed_hosts": ("host:notaport",)},
        {"allowed_hosts": ("[::1]x",)},
        {"allowed_hosts": ("bad host",)},
        {"allowed_hosts": ("",)},
    ],
)
def test_policy_refuses_unsafe_or_malformed_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FetchPolicy(**options)


# --------------------------------------------------------------------------- decoding: accepted


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("JPEG", {"quality": 95}), ("GIF", {}), ("WEBP", {"lossless": True}), ("BMP", {})],
)
def test_allowed_formats_decode_to_rgb(fmt: str, params: dict[str, Any]) -> None:
    data = solid(fmt, (24, 16), RED, **params)
    assert sniff_format(data) == fmt
    image = decode_image(data, POLICY)
    assert (image.mode, image.size) == ("RGB", (24, 16))
    assert close(image.getpixel((5, 5)), RED)


def test_tiff_is_off_by_default_and_can_be_enabled() -> None:
    data = solid("TIFF")
    assert rejected(data).code == "unsupported_format"
    image = decode_image(data, FetchPolicy(allowed_formats=DEFAULT_FORMATS | {"TIFF"}))
    assert image.mode == "RGB"


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent: white, not black
        (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), "PNG", RED),
        (Image.new("LA", (4, 4), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("L", (4, 4), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
        (Image.new("I;16", (4, 4), 32768), "PNG", (128, 128, 128)),  # scaled, not clipped to white
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", RED),
        (Image.new("RGBA", (4, 4), (0, 0, 255, 0)), "WEBP", (255, 255, 255)),
    ],
)
def test_modes_are_converted_to_rgb(image: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    decoded = decode_image(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})), POLICY)
    assert decoded.mode == "RGB"
    assert close(decoded.getpixel((1, 1)), expected, tolerance=3 if fmt != "JPEG" else 40)


def test_palette_transparency_becomes_white() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    data = encode(image, "GIF", transparency=1)
    assert decode_image(data, POLICY).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("orientation", "size", "red_at"),
    [
        (1, (40, 20), (5, 10)),  # as stored: red on the left
        (3, (40, 20), (35, 10)),  # rotated 180: red on the right
        (6, (20, 40), (10, 5)),  # rotated 90 clockwise: red on top
        (8, (20, 40), (10, 35)),  # rotated 90 counter-clockwise: red at the bottom
        (2, (40, 20), (35, 10)),  # mirrored
    ],
)
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int], red_at: tuple[int, int]) -> None:
    image = decode_image(jpeg_with_orientation(orientation), POLICY)
    assert image.size == size
    assert close(image.getpixel(red_at), RED)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_the_first_frame(fmt: str) -> None:
    image = decode_image(animated(fmt, (RED, GREEN, BLUE)), POLICY)
    assert (image.mode, image.size) == ("RGB", (8, 8))
    assert close(image.getpixel((4, 4)), RED, tolerance=10)


def test_gif_with_a_hundred_thousand_frames_decodes_only_the_first_fast() -> None:
    data = gif(4, 4, frames=100_000)
    assert len(data) > 2_000_000
    started = time.perf_counter()
    image = decode_image(data, POLICY)
    assert time.perf_counter() - started < 0.5
    assert image.getpixel((0, 0)) == RED


# --------------------------------------------------------------------------- decoding: refused


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!DOCTYPE html><html><body>404</body></html>",
        b"<html><head></head></html>",
        b'{"error": "not found"}',
        b"plain text that is not an image",
        bytes(range(256)) * 4,
        b"\x00" * 1024,
        b"BM but actually just text",
        b"\x1f\x8b\x08\x00" + b"\x00" * 50,  # gzip
        b"PK\x03\x04" + b"\x00" * 50,  # zip
    ],
    ids=["empty", "html", "html-no-doctype", "json", "text", "random", "zeros", "bm-text", "gzip", "zip"],
)
def test_non_images_are_refused(data: bytes) -> None:
    error = rejected(data)
    assert error.code == "not_an_image"
    assert "not an image" in error.message


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', "SVG"),
        (b'\xef\xbb\xbf<?xml version="1.0"?>\n<!DOCTYPE svg>\n<svg width="1" height="1"/>', "SVG"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS"),
        (b"\xc5\xd0\xd3\xc6" + b"\x00" * 40, "EPS"),
        (b"8BPS\x00\x01" + b"\x00" * 40, "PSD"),
        (b"\x00\x00\x01\x00\x01\x00" + b"\x00" * 40, "ICO"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 40, "JPEG2000"),
        (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 40, "AVIF"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40, "HEIF"),
        (solid("TIFF"), "TIFF"),
    ],
)
def test_recognised_but_disallowed_formats_are_unsupported(data: bytes, name: str) -> None:
    error = rejected(data)
    assert error.code == "unsupported_format"
    assert error.message.startswith(f"{name} images are not accepted")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_truncated_images_are_corrupt(fmt: str, keep: float) -> None:
    data = encode(gradient((64, 48)), fmt)
    error = rejected(data[: max(int(len(data) * keep), 40)])
    assert error.code == "corrupt_image"
    assert fmt in error.message


# --------------------------------------------------------------------------- bombs


def test_png_50k_by_50k_header_bomb_fails_fast() -> None:
    data = png_header_bomb(50_000, 50_000)
    assert len(data) < 4096
    started = time.perf_counter()
    error = rejected(data)
    assert time.perf_counter() - started < 0.2
    assert error.code == "image_too_many_pixels"


@pytest.mark.parametrize(
    "size",
    [(8_000, 8_000), (10_000, 10_000), (50_000, 50_000), (1, 2**31 - 1)],
    ids=["above-ours-below-pillow", "in-pillows-warning-band", "above-pillows-error", "one-pixel-wide"],
)
def test_pixel_cap_is_ours_whatever_pillow_is_set_to(size: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    for pillow_limit in (Image.MAX_IMAGE_PIXELS, None):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
        started = time.perf_counter()
        assert rejected(png_header_bomb(*size)).code == "image_too_many_pixels"
        assert time.perf_counter() - started < 0.2


def test_small_policy_cap_applies_to_ordinary_images() -> None:
    error = rejected(solid("PNG", (100, 100)), FetchPolicy(max_pixels=9_999))
    assert error.code == "image_too_many_pixels"
    assert "100x100" in error.message


@pytest.mark.parametrize("screen", [(65_535, 65_535), (8_000, 8_000)])
def test_gif_logical_screen_bomb(screen: tuple[int, int]) -> None:
    started = time.perf_counter()
    assert rejected(gif(*screen)).code == "image_too_many_pixels"
    assert time.perf_counter() - started < 0.2


def test_pillow_bomb_error_maps_to_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow refuses above 100
    error = rejected(solid("PNG", (12, 12)), FetchPolicy(max_pixels=1000))
    assert error.code == "image_too_many_pixels"
    assert isinstance(error.__cause__, Image.DecompressionBombError)


# --------------------------------------------------------------------------- Pillow's warnings


def test_the_start_up_filter_silences_pillows_warnings_even_where_warnings_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: Pillow warns, ours allows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Image.DecompressionBombWarning):
            decode_image(solid("PNG", (12, 12)), FetchPolicy(max_pixels=1000))
        install_pillow_warning_filter()
        assert decode_image(solid("PNG", (12, 12)), FetchPolicy(max_pixels=1000)).size == (12, 12)
        assert close(decode_image(jpeg_with_corrupt_exif(), POLICY).getpixel((4, 4)), GREEN)


def test_corrupt_exif_warning_is_contained() -> None:
    image = decode_image(jpeg_with_corrupt_exif(), POLICY)  # filterwarnings=error would raise
    assert close(image.getpixel((4, 4)), GREEN)


def test_decodes_overlap_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """One slow decode must not hold up the fetch pool's others (a global lock around decoding did)."""
    real_open = Image.open
    slow_started, release = threading.Event(), threading.Event()

    def open_slowly(fp: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "slow":
            slow_started.set()
            release.wait(10)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_slowly)
    slow = threading.Thread(target=decode_image, args=(solid("PNG", (12, 12)), POLICY), name="slow")
    slow.start()
    try:
        assert slow_started.wait(5)
        done: list[Image.Image] = []
        fast = threading.Thread(target=lambda: done.append(decode_image(solid("PNG", (12, 12)), POLICY)))
        fast.start()
        fast.join(timeout=5)
        assert done, "a decode waited for another thread's decode to finish"
    finally:
        release.set()
        slow.join()


def test_concurrent_decodes_leave_the_warning_filters_as_they_were() -> None:
    before = list(warnings.filters)
    data = jpeg_with_corrupt_exif()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(30):
                decode_image(data, POLICY)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert warnings.filters == before


# --------------------------------------------------------------------------- URLs and addresses


def vetted(url: str, rules: HostRules = HostRules()) -> list[str]:
    return [str(ip) for ip in netguard.vet(netguard.parse_http_url(url), rules, timeout=5)]


BLOCKED = [
    "http://127.0.0.1/",
    "http://127.255.255.254/",
    "http://localhost/",
    "http://LocalHost./",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://0x7f.1/",
    "http://127.1/",
    "http://017700000001/",
    "http://0/",
    "http://0.0.0.0/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://172.31.255.255/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://100.100.100.200/",
    "http://192.0.2.1/",
    "http://198.18.0.1/",
    "http://224.0.0.1/",
    "http://239.255.255.250:1900/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://[::1]/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[::127.0.0.1]/",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[fc00::1]/",
    "http://[fd00:ec2::254]/",
    "http://[ff02::1]/",
    "http://[fec0::1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[64:ff9b:1::1]/",
    "http://[2002:7f00:1::]/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
    "http://[2001:db8::1]/",
    "http://allowed.example@127.0.0.1/",
    "https://user:pw@[::1]:8443/",
    "http://１２７.０.０.１/",
    "http://127。0。0。1/",
]


@pytest.mark.parametrize("url", BLOCKED)
def test_internal_addresses_are_blocked(url: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        vetted(url)
    assert caught.value.code == "blocked_address"
    assert "VQA_ALLOWED_HOSTS" in caught.value.message


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://93.184.216.34/", "93.184.216.34"),
        ("http://8.8.8.8:8080/x.png", "8.8.8.8"),
        ("http://134744072/", "8.8.8.8"),
        ("https://[2606:4700:4700::1111]/", "2606:4700:4700::1111"),
        ("http://[::ffff:8.8.8.8]/", "8.8.8.8"),
        ("http://[64:ff9b::808:808]/", "64:ff9b::808:808"),
        ("http://[2002:808:808::1]/", "2002:808:808::1"),
        ("http://172.32.0.1/", "172.32.0.1"),
        ("http://100.128.0.1/", "100.128.0.1"),
    ],
)
def test_public_addresses_pass(url: str, address: str) -> None:
    assert vetted(url) == [address]


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("10.1.2.3", "private"),
        ("::ffff:192.168.0.1", "private"),
        ("64:ff9b::a00:1", "private"),
        ("fd12::1", "unique-local"),
        ("2001::1", "Teredo"),
        ("ff05::2", "multicast"),
    ],
)
def test_blocked_reason_names_the_range(ip: str, reason: str) -> None:
    found = netguard.blocked_reason(ipaddress.ip_address(ip))
    assert found is not None and reason in found


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1\\@example.com/",
        "http://example.com/a b.png",
        "http://example.com/\x00.png",
        "http://example.com/\r\nHost: evil",
        "http://[::1/",
        "http://[v1.x]/",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://example.com:-1/",
        "http://:80/",
        "http:///x.png",
        "http://%31%32%37.0.0.1/",
        "http://exa_mple..com/",
        "http://" + "a" * 64 + ".com/",
        "http://example.com/" + "a" * 9000,
    ],
)
def test_malformed_urls_are_bad_url(url: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        fetch_bytes(url, POLICY)
    assert caught.value.code == "bad_url"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "FILE:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "dict://127.0.0.1:6379/info",
        "ftp://example.com/a.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "ldap://example.com/",
        "jar:http://example.com/a.jar!/a.png",
        "//example.com/a.png",
        "example.com/a.png",
        "s3://bucket/key.png",  # no S3 client and no allowed bucket
    ],
)
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        fetch_bytes(url, FetchPolicy(allowed_s3_buckets={"bucket"}))
    assert caught.value.code == "bad_scheme"


def test_url_parsing_keeps_one_reading() -> None:
    target = netguard.parse_http_url("HTTPS://user:pw@Bücher.example.:8443/a b%20c/ü.png?q=ä&x=1#frag".replace(" ", "%20"))
    assert (target.scheme, target.host, target.port) == ("https", "xn--bcher-kva.example", 8443)
    assert target.request_target == "/a%20b%20c/%C3%BC.png?q=%C3%A4&x=1"
    assert target.host_header == "xn--bcher-kva.example:8443"
    assert netguard.parse_http_url("http://[::1]/").host_header == "[::1]"
    assert netguard.parse_http_url("http://example.com").request_target == "/"


# --------------------------------------------------------------------------- allowed_hosts


@pytest.mark.parametrize(
    ("entries", "url", "allowed"),
    [
        (("localhost",), "http://localhost:8080/", True),
        (("localhost",), "http://localhost./", True),
        (("localhost",), "http://127.0.0.1/", False),  # a name excepts the name, not its address
        (("127.0.0.1:8080",), "http://127.0.0.1:8080/", True),
        (("127.0.0.1:8080",), "http://2130706433:8080/", True),  # same address, odd spelling
        (("127.0.0.1:8080",), "http://[::ffff:127.0.0.1]:8080/", True),
        (("127.0.0.1:8080",), "http://localhost:8080/", True),
        (("127.0.0.1:8080",), "http://127.0.0.1:8081/", False),
        (("127.0.0.1:8080",), "http://127.0.0.2:8080/", False),
        (("[::1]:9000",), "http://[::1]:9000/", True),
        (("[::1]:9000",), "http://[::1]:9001/", False),
        (("::1",), "http://[::1]:1234/", True),
        (("10.0.0.0/8",), "http://10.20.30.40:9000/", True),
        (("10.0.0.0/8",), "http://192.168.1.1/", False),
        (("10.0.0.0/8",), "http://127.0.0.1/", False),
        (("10.0.0.0/8",), "http://169.254.169.254/", False),
        (("fd00::/8",), "http://[fd00::5]/", True),
        (("::ffff:127.0.0.1",), "http://127.0.0.1/", True),
    ],
)
def test_allowed_hosts_are_narrow_exceptions(entries: tuple[str, ...], url: str, allowed: bool) -> None:
    if allowed:
        assert vetted(url, HostRules(entries))
    else:
        with pytest.raises(ImageRejected, match="VQA_ALLOWED_HOSTS"):
            vetted(url, HostRules(entries))


def test_allowed_host_name_with_port(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(host: str, port: int, *_: Any, **__: Any) -> list[tuple[Any, ...]]:
        assert host == "minio"
        return [(2, 1, 6, "", ("172.18.0.5", port))]

    monkeypatch.setattr(netguard.socket, "getaddrinfo", fake)
    rules = HostRules(("minio:9000",))
    assert vetted("http://minio:9000/img.png", rules) == ["172.18.0.5"]
    with pytest.raises(ImageRejected):
        vetted("http://minio:9001/img.png", rules)


# --------------------------------------------------------------------------- s3://


@pytest.fixture()
def s3() -> Any:
    return boto3.client("s3", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")


S3_POLICY = FetchPolicy(allowed_s3_buckets={"images"}, max_bytes=10_000)


def test_s3_object_is_read(s3: Any) -> None:
    data = solid("PNG")
    with Stubber(s3) as stub:
        stub.add_response(
            "get_object",
            {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data)},
            {"Bucket": "images", "Key": "cats/a cat?.png"},
        )
        assert fetch_bytes("s3://images/cats/a cat?.png", S3_POLICY, s3_client=s3) == data


def test_s3_bucket_not_allowed(s3: Any) -> None:
    with pytest.raises(ImageRejected) as caught:
        fetch_bytes("s3://vqa-results/secret.json", S3_POLICY, s3_client=s3)
    assert caught.value.code == "blocked_address"


def test_s3_oversized_object(s3: Any) -> None:
    with Stubber(s3) as stub:
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(b""), 0), "ContentLength": 10**9})
        with pytest.raises(ImageRejected) as caught:
            fetch_bytes("s3://images/big.png", S3_POLICY, s3_client=s3)
    assert caught.value.code == "too_large"


def test_s3_body_longer_than_declared_is_cut(s3: Any) -> None:
    with Stubber(s3) as stub:
        stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(bytes(50_000)), 50_000)})
        with pytest.raises(ImageRejected) as caught:
            fetch_bytes("s3://images/big.png", S3_POLICY, s3_client=s3)
    assert caught.value.code == "too_large"


@pytest.mark.parametrize(
    ("error_code", "status", "kind", "code"),
    [
        ("NoSuchKey", 404, ImageRejected, "http_status"),
        ("AccessDenied", 403, ImageRejected, "http_status"),
        ("InternalError", 500, StorageUnavailable, "storage_unavailable"),
        ("SlowDown", 503, StorageUnavailable, "storage_unavailable"),
    ],
)
def test_s3_errors_are_translated(s3: Any, error_code: str, status: int, kind: type[VQAError], code: str) -> None:
    with Stubber(s3) as stub:
        stub.add_client_error("get_object", service_error_code=error_code, http_status_code=status)
        with pytest.raises(kind) as caught:
            fetch_bytes("s3://images/missing.png", S3_POLICY, s3_client=s3)
    assert caught.value.code == code
    assert error_code in caught.value.message


def test_s3_unreachable_is_transient() -> None:
    client = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1),
    )
    with pytest.raises(StorageUnavailable):
        fetch_bytes("s3://images/a.png", S3_POLICY, s3_client=client)
