"""The fetcher against real, hostile HTTP servers on loopback.

``origin`` is the one server an operator allowed (``127.0.0.1:<its port>``); ``canary`` and
``canary6`` are servers nobody allowed, which count every connection. Every SSRF attempt
must end in ``blocked_address`` with the canaries untouched, and every abusive response must
end in its typed error within the deadline and without buffering the abuse in memory.
"""

from __future__ import annotations

import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from producer.errors import FetchTimeout, ImageRejected, UpstreamUnavailable, VQAError
from tests.support.abusive_http import (
    AbusiveServer,
    ipv6_loopback_available,
    make_tls_context,
    wait_until,
    write_self_signed_cert,
)
from tests.support.fake_dns import FakeDNS
from worker.fetch.download import tls_context
from worker.fetch.images import FetchPolicy, fetch_bytes, fetch_image

MIB = 1024 * 1024
pytestmark = pytest.mark.timeout(30)


@pytest.fixture()
def origin() -> Iterator[AbusiveServer]:
    with AbusiveServer() as server:
        yield server


@pytest.fixture()
def canary() -> Iterator[AbusiveServer]:
    with AbusiveServer() as server:
        yield server
    assert server.connections == 0, f"the canary was reached: {server.requests}"


@pytest.fixture()
def canary6() -> Iterator[AbusiveServer]:
    if not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback here")
    with AbusiveServer("::1") as server:
        yield server
    assert server.connections == 0, f"the IPv6 canary was reached: {server.requests}"


def policy_for(origin: AbusiveServer, **overrides: Any) -> FetchPolicy:
    options: dict[str, Any] = {
        "allowed_hosts": (f"127.0.0.1:{origin.port}",),
        "connect_timeout_s": 2.0,
        "total_timeout_s": 5.0,
        "max_bytes": 2 * MIB,
    }
    options.update(overrides)
    return FetchPolicy(**options)


def expect(code: str, call: Callable[[], object], kind: type[VQAError] = ImageRejected) -> VQAError:
    with pytest.raises(kind) as caught:
        call()
    assert caught.value.code == code, caught.value
    return caught.value


@pytest.fixture()
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    dns = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", dns.getaddrinfo)
    return dns


# --------------------------------------------------------------------------- SSRF corpus

# {c}: the IPv4 canary's port, {c6}: the IPv6 canary's, {o}: the allowed origin's.
DIRECT = [
    "http://127.0.0.1:{c}/png",
    "http://localhost:{c}/png",
    "http://localhost.:{c}/png",
    "http://LocalHost:{c}/png",
    "HTTP://127.0.0.1:{c}/png",
    "https://127.0.0.1:{c}/png",
    "http://2130706433:{c}/png",
    "http://0x7f000001:{c}/png",
    "http://0177.0.0.1:{c}/png",
    "http://0177.0000.0000.0001:{c}/png",
    "http://017700000001:{c}/png",
    "http://0x7f.0x0.0x0.0x1:{c}/png",
    "http://0x7f.1:{c}/png",
    "http://127.1:{c}/png",
    "http://127.0.1:{c}/png",
    "http://127.000.000.001:{c}/png",
    "http://127.0.0.1.:{c}/png",
    "http://0.0.0.0:{c}/png",
    "http://0:{c}/png",
    "http://１２７.０.０.１:{c}/png",
    "http://127。0。0。1:{c}/png",
    "http://[::ffff:127.0.0.1]:{c}/png",
    "http://[::ffff:7f00:1]:{c}/png",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:{c}/png",
    "http://[::ffff:0.0.0.0]:{c}/png",
    "http://[::127.0.0.1]:{c}/png",
    "http://[64:ff9b::7f00:1]:{c}/png",
    "http://[2002:7f00:1::]:{c}/png",
    "http://[::1]:{c6}/png",
    "http://[0:0:0:0:0:0:0:1]:{c6}/png",
    "http://[::]:{c6}/png",
    "http://[::1%25lo]:{c6}/png",
    "http://allowed.example@127.0.0.1:{c}/png",
    "http://127.0.0.1:{o}@127.0.0.1:{c}/png",
    "http://localhost:{o}@localhost:{c}/png",
    "http://127.0.0.1:{c}#@127.0.0.1:{o}/png",
    "http://127.0.0.1:{c}?@127.0.0.1:{o}/png",
]

# Served as a redirect by the allowed origin: each hop is vetted again.
VIA_REDIRECT = [
    ("302", "http://127.0.0.1:{c}/png"),
    ("301", "http://localhost:{c}/png"),
    ("303", "http://2130706433:{c}/png"),
    ("307", "http://[::ffff:127.0.0.1]:{c}/png"),
    ("308", "http://[::1]:{c6}/png"),
    ("302", "//127.0.0.1:{c}/png"),
    ("302", "http://0:{c}/png"),
    ("302", "http://0x7f.1:{c}/png"),
    ("302", "https://localhost:{c}/png"),
]


def _fill(template: str, origin: AbusiveServer, canary: AbusiveServer, canary6: AbusiveServer) -> str:
    return template.format(c=canary.port, c6=canary6.port, o=origin.port)


@pytest.mark.parametrize("template", DIRECT)
def test_direct_ssrf_is_blocked(template: str, origin: AbusiveServer, canary: AbusiveServer, canary6: AbusiveServer) -> None:
    url = _fill(template, origin, canary, canary6)
    expect("blocked_address", lambda: fetch_bytes(url, policy_for(origin)))


@pytest.mark.parametrize(("status", "template"), VIA_REDIRECT)
def test_redirect_to_internal_is_blocked(
    status: str, template: str, origin: AbusiveServer, canary: AbusiveServer, canary6: AbusiveServer
) -> None:
    url = origin.url("/redirect?" + urlencode({"to": _fill(template, origin, canary, canary6), "status": status}))
    expect("blocked_address", lambda: fetch_bytes(url, policy_for(origin)))
    assert origin.request_count == 1


def test_redirect_chain_ending_internal_is_blocked(origin: AbusiveServer, canary: AbusiveServer) -> None:
    inner = origin.url("/redirect?" + urlencode({"to": f"http://127.0.0.1:{canary.port}/png"}))
    middle = origin.url("/redirect?" + urlencode({"to": inner, "status": "307"}))
    outer = origin.url("/redirect?" + urlencode({"to": middle}))
    expect("blocked_address", lambda: fetch_bytes(outer, policy_for(origin)))
    assert origin.request_count == 3


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{c}\\@127.0.0.1:{o}/png",
        "http://127.0.0.1:{c}/ png",
        "http://127.0.0.1:{c}/png\r\nX-Injected: 1",
        " http://127.0.0.1:{c}/png",
    ],
)
def test_ambiguous_urls_are_refused_before_any_connection(
    template: str, origin: AbusiveServer, canary: AbusiveServer, canary6: AbusiveServer
) -> None:
    url = _fill(template, origin, canary, canary6)
    expect("bad_url", lambda: fetch_bytes(url, policy_for(origin)))
    assert origin.connections == 0


@pytest.mark.parametrize("target", ["file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "s3://bucket/key"])
def test_redirect_to_other_scheme_is_refused(target: str, origin: AbusiveServer, canary: AbusiveServer) -> None:
    url = origin.url("/redirect?" + urlencode({"to": target}))
    policy = policy_for(origin, allowed_s3_buckets={"bucket"})
    expect("bad_scheme", lambda: fetch_bytes(url, policy, s3_client=object()))


def test_dns_is_resolved_once_so_rebinding_cannot_switch_the_address(
    origin: AbusiveServer, canary: AbusiveServer, fake_dns: FakeDNS
) -> None:
    # First answer: the allowed origin. Any later lookup would get a blackhole address.
    fake_dns.answers["rebind.test"] = [["127.0.0.1"], ["10.255.255.1"]]
    image = fetch_image(f"http://rebind.test:{origin.port}/png", policy_for(origin))
    assert image.size == (24, 16)
    assert fake_dns.calls == ["rebind.test"]


def test_a_name_with_one_internal_address_among_public_ones_is_blocked(
    origin: AbusiveServer, canary: AbusiveServer, fake_dns: FakeDNS
) -> None:
    fake_dns.answers["mixed.test"] = [["93.184.216.34", "127.0.0.1"]]
    expect("blocked_address", lambda: fetch_bytes(f"http://mixed.test:{canary.port}/png", policy_for(origin)))


def test_unknown_host_is_permanent(origin: AbusiveServer, fake_dns: FakeDNS) -> None:
    expect("unknown_host", lambda: fetch_bytes("http://missing.test/png", policy_for(origin)))


def test_hostname_exception_sends_original_host_and_no_credentials(origin: AbusiveServer) -> None:
    policy = policy_for(origin, allowed_hosts=("localhost",))
    body = fetch_bytes(f"http://user:secret@LOCALHOST:{origin.port}/echo?size=big&x=%41", policy).decode()
    assert body.splitlines()[0] == "GET /echo?size=big&x=%41"
    assert f"Host: localhost:{origin.port}" in body
    assert "Authorization" not in body and "secret" not in body
    assert "Accept-Encoding: identity" in body


# --------------------------------------------------------------------------- abusive servers


def test_wrong_content_type_with_valid_png_is_accepted(origin: AbusiveServer) -> None:
    image = fetch_image(origin.url("/png-as-html"), policy_for(origin))
    assert (image.mode, image.size) == ("RGB", (24, 16))


def test_animated_gif_over_http_gives_first_frame(origin: AbusiveServer) -> None:
    image = fetch_image(origin.url("/gif-animated"), policy_for(origin))
    assert image.getpixel((4, 4)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/jpeg-truncated", "corrupt_image"),
        ("/html", "not_an_image"),
        ("/svg", "unsupported_format"),
        ("/empty", "not_an_image"),
        ("/gzip-bomb", "not_an_image"),  # never inflated: Accept-Encoding identity, raw bytes kept
    ],
)
def test_bad_content_is_refused_by_what_it_is(path: str, code: str, origin: AbusiveServer) -> None:
    expect(code, lambda: fetch_image(origin.url(path), policy_for(origin)))


def test_declared_huge_body_is_refused_before_reading(origin: AbusiveServer) -> None:
    started = time.monotonic()
    error = expect("too_large", lambda: fetch_bytes(origin.url("/huge-declared"), policy_for(origin)))
    assert time.monotonic() - started < 2
    assert "1,073,741,824 bytes" in error.message


@pytest.mark.parametrize("path", ["/huge-undeclared", "/endless-chunked"])
def test_streamed_body_is_cut_at_the_cap_with_flat_memory(path: str, origin: AbusiveServer) -> None:
    policy = policy_for(origin, max_bytes=2 * MIB)
    tracemalloc.start()
    try:
        started = time.monotonic()
        expect("too_large", lambda: fetch_bytes(origin.url(path), policy))
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5
    # The body is 1 GiB (or endless); the fetch holds at most the cap plus a chunk.
    assert peak < 12 * MIB, f"peak traced memory {peak / MIB:.1f} MiB"


@pytest.mark.parametrize("path", ["/trickle", "/trickle-undeclared", "/trickle-headers"])
def test_trickling_server_is_cut_off_at_the_total_deadline(path: str, origin: AbusiveServer) -> None:
    policy = policy_for(origin, total_timeout_s=1.5)
    started = time.monotonic()
    expect("timeout", lambda: fetch_bytes(origin.url(path), policy), FetchTimeout)
    elapsed = time.monotonic() - started
    assert 1.3 < elapsed < 3.0, elapsed


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
def test_server_errors_are_transient(status: int, origin: AbusiveServer) -> None:
    error = expect("http_status", lambda: fetch_bytes(origin.url(f"/status/{status}"), policy_for(origin)), UpstreamUnavailable)
    assert error.retryable


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 304, 300])
def test_client_errors_are_permanent(status: int, origin: AbusiveServer) -> None:
    error = expect("http_status", lambda: fetch_bytes(origin.url(f"/status/{status}"), policy_for(origin)))
    assert not error.retryable
    assert str(status) in error.message


def test_redirect_loop_is_cut(origin: AbusiveServer) -> None:
    expect("too_many_redirects", lambda: fetch_bytes(origin.url("/loop"), policy_for(origin, max_redirects=5)))
    assert origin.request_count == 6  # the first request and five redirects


def test_redirect_chain_within_the_limit_is_followed(origin: AbusiveServer) -> None:
    image = fetch_image(origin.url("/chain/3"), policy_for(origin, max_redirects=3))
    assert image.size == (24, 16)
    expect("too_many_redirects", lambda: fetch_bytes(origin.url("/chain/4"), policy_for(origin, max_redirects=3)))


def test_redirect_without_location_is_refused(origin: AbusiveServer) -> None:
    expect("http_status", lambda: fetch_bytes(origin.url("/redirect-no-location"), policy_for(origin)))


def test_short_body_is_a_transient_connection_failure(origin: AbusiveServer) -> None:
    expect("connection_failed", lambda: fetch_bytes(origin.url("/short-body"), policy_for(origin)), UpstreamUnavailable)


def test_connection_reset_is_transient(origin: AbusiveServer) -> None:
    expect("connection_failed", lambda: fetch_bytes(origin.url("/reset"), policy_for(origin)), UpstreamUnavailable)


def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the fetch: nothing listens
    policy = FetchPolicy(allowed_hosts=(f"127.0.0.1:{port}",), total_timeout_s=3)
    expect("connection_failed", lambda: fetch_bytes(f"http://127.0.0.1:{port}/png", policy), UpstreamUnavailable)


def test_connect_timeout_when_nobody_accepts() -> None:
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        # Fill the accept queue until a connect hangs; then every later SYN goes unanswered.
        for _ in range(8):
            filler = socket.socket()
            fillers.append(filler)
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("this kernel accepts connections beyond the listen backlog")
        policy = FetchPolicy(allowed_hosts=(f"127.0.0.1:{port}",), connect_timeout_s=0.5, total_timeout_s=5)
        started = time.monotonic()
        expect("timeout", lambda: fetch_bytes(f"http://127.0.0.1:{port}/png", policy), FetchTimeout)
        assert time.monotonic() - started < 2
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# --------------------------------------------------------------------------- TLS


@pytest.fixture()
def tls_origin(tmp_path: Path) -> Iterator[tuple[AbusiveServer, str, list[str | None]]]:
    cert, key = write_self_signed_cert(tmp_path, ["images.test"])
    seen_sni: list[str | None] = []
    with AbusiveServer(tls_context=make_tls_context(cert, key, seen_sni=seen_sni)) as server:
        yield server, cert, seen_sni


def test_https_connects_to_the_vetted_ip_with_sni_and_certificate_name(
    tls_origin: tuple[AbusiveServer, str, list[str | None]], fake_dns: FakeDNS
) -> None:
    server, cert, seen_sni = tls_origin
    fake_dns.answers["images.test"] = [["127.0.0.1"], ["10.255.255.1"]]
    policy = FetchPolicy(allowed_hosts=("images.test",), ca_bundle=cert, total_timeout_s=5)
    image = fetch_image(f"https://images.test:{server.port}/png", policy)
    assert image.size == (24, 16)
    assert seen_sni == ["images.test"]
    assert fake_dns.calls == ["images.test"]


def test_https_connections_share_one_tls_context_per_trust_store(
    tls_origin: tuple[AbusiveServer, str, list[str | None]], fake_dns: FakeDNS
) -> None:
    server, cert, seen_sni = tls_origin
    fake_dns.answers["images.test"] = [["127.0.0.1"]]
    policy = FetchPolicy(allowed_hosts=("images.test",), ca_bundle=cert, total_timeout_s=5)  # no kept connections
    built = tls_context.cache_info().misses
    for _ in range(3):
        fetch_bytes(f"https://images.test:{server.port}/png", policy)
    assert server.connections == 3 and seen_sni == ["images.test"] * 3  # three handshakes, each verified ...
    assert tls_context.cache_info().misses - built == 1  # ... with one context, the trust store loaded once


def test_https_certificate_for_another_name_is_refused(
    tls_origin: tuple[AbusiveServer, str, list[str | None]], fake_dns: FakeDNS
) -> None:
    server, cert, _ = tls_origin
    fake_dns.answers["other.test"] = [["127.0.0.1"]]
    policy = FetchPolicy(allowed_hosts=("other.test",), ca_bundle=cert, total_timeout_s=5)
    expect("tls_error", lambda: fetch_bytes(f"https://other.test:{server.port}/png", policy))
    assert wait_until(lambda: server.connections == 1)
    assert server.request_count == 0


def test_https_untrusted_certificate_is_refused(tls_origin: tuple[AbusiveServer, str, list[str | None]], fake_dns: FakeDNS) -> None:
    server, _, _ = tls_origin
    fake_dns.answers["images.test"] = [["127.0.0.1"]]
    policy = FetchPolicy(allowed_hosts=("images.test",), total_timeout_s=5)  # system trust store
    expect("tls_error", lambda: fetch_bytes(f"https://images.test:{server.port}/png", policy))


def test_https_trickle_is_cut_off_at_the_total_deadline(
    tls_origin: tuple[AbusiveServer, str, list[str | None]], fake_dns: FakeDNS
) -> None:
    server, cert, _ = tls_origin
    fake_dns.answers["images.test"] = [["127.0.0.1"]]
    policy = FetchPolicy(allowed_hosts=("images.test",), ca_bundle=cert, total_timeout_s=1.5)
    started = time.monotonic()
    expect("timeout", lambda: fetch_bytes(f"https://images.test:{server.port}/trickle", policy), FetchTimeout)
    assert time.monotonic() - started < 3.0


# --------------------------------------------------------------------------- silence and IPv6


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_server_that_accepts_but_never_answers_is_cut_off(scheme: str) -> None:
    # The kernel completes the TCP handshake for a listener that never calls accept(): the
    # fetch then waits in the TLS handshake (https) or for the status line (http).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        policy = FetchPolicy(allowed_hosts=(f"127.0.0.1:{port}",), connect_timeout_s=5, total_timeout_s=1.5)
        started = time.monotonic()
        expect("timeout", lambda: fetch_bytes(f"{scheme}://127.0.0.1:{port}/png", policy), FetchTimeout)
        assert time.monotonic() - started < 3.0


def test_allowed_ipv6_origin_is_fetched_with_a_bracketed_host_header() -> None:
    if not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback here")
    with AbusiveServer("::1") as server:
        policy = FetchPolicy(allowed_hosts=(f"[::1]:{server.port}",), total_timeout_s=5)
        body = fetch_bytes(server.url("/echo"), policy).decode()
        assert f"Host: [::1]:{server.port}" in body
        assert fetch_image(server.url("/png"), policy).size == (24, 16)
