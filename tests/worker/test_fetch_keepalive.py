"""Image-host connections kept between fetches (VQA_FETCH_KEEPALIVE_S): reused where they may be, never past vetting, a deadline or a close."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.errors import FetchTimeout, ImageRejected, UpstreamUnavailable
from producer.settings import Settings
from tests.support.abusive_http import make_tls_context, write_self_signed_cert
from tests.support.clock import ManualClock
from tests.support.fake_dns import FakeDNS
from tests.support.keepalive_http import KeepAliveServer
from worker.fetch.images import FetchPolicy, fetch_bytes
from worker.fetch.kept import KeptConnections

pytestmark = pytest.mark.timeout(30)


@pytest.fixture()
def host() -> Iterator[KeepAliveServer]:
    with KeepAliveServer() as server:
        yield server


@pytest.fixture()
def kept() -> Iterator[KeptConnections]:
    connections = KeptConnections(idle_s=15)
    yield connections
    connections.close()  # an unclosed socket is a ResourceWarning, which fails the suite


@pytest.fixture()
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    dns = FakeDNS()
    monkeypatch.setattr("socket.getaddrinfo", dns.getaddrinfo)
    return dns


def policy(server: KeepAliveServer, kept: KeptConnections | None, **overrides: Any) -> FetchPolicy:
    options: dict[str, Any] = {"allowed_hosts": (f"127.0.0.1:{server.port}",), "connect_timeout_s": 2.0, "total_timeout_s": 5.0,
                               "connections": kept}
    return FetchPolicy(**{**options, **overrides})


def test_one_connection_serves_a_hosts_fetches_one_after_another(host: KeepAliveServer, kept: KeptConnections) -> None:
    bodies = [fetch_bytes(host.url(), policy(host, kept)) for _ in range(5)]
    assert len(set(bodies)) == 1 and bodies[0].startswith(b"\x89PNG")
    assert (host.connections, len(host.requests), kept.reused, len(kept)) == (1, 5, 4, 1)


def test_a_kept_connection_is_not_held_up_by_a_host_that_delays_small_writes(host: KeepAliveServer, kept: KeptConnections) -> None:
    # This host writes headers and body apart without TCP_NODELAY, as Python's http.server does: on a
    # kept connection whose ACKs Linux delays, each body would wait ~40 ms for the ACK of its headers.
    fetch_bytes(host.url(), policy(host, kept))
    started = time.monotonic()
    for _ in range(20):
        fetch_bytes(host.url(), policy(host, kept))
    assert time.monotonic() - started < 0.4  # about 20 ms here; 20 held-back bodies would be 0.8 s
    assert kept.reused == 20


def test_without_kept_connections_every_fetch_connects(host: KeepAliveServer) -> None:
    for _ in range(3):
        fetch_bytes(host.url(), policy(host, None))
    assert host.connections == 3


def test_settings_turn_keep_alive_off_with_zero() -> None:
    assert FetchPolicy.from_settings(Settings(fetch_keepalive_s=0)).connections is None
    kept = FetchPolicy.from_settings(Settings(fetch_concurrency=3)).connections
    assert kept is not None and (kept.idle_s, kept.per_key) == (15.0, 3)


def test_an_answer_that_says_close_is_not_kept(host: KeepAliveServer, kept: KeptConnections) -> None:
    for _ in range(2):
        fetch_bytes(host.url("/close"), policy(host, kept))
    assert (host.connections, kept.reused, len(kept)) == (2, 0, 0)


def test_a_connection_the_host_closed_while_kept_is_not_used(host: KeepAliveServer, kept: KeptConnections) -> None:
    fetch_bytes(host.url("/hangup"), policy(host, kept))
    time.sleep(0.2)  # the host's close reaches us while the connection is kept
    assert fetch_bytes(host.url(), policy(host, kept)).startswith(b"\x89PNG")
    assert (host.connections, kept.reused) == (2, 0)


def test_a_host_that_closes_as_the_request_arrives_gets_it_again_on_a_new_connection(kept: KeptConnections) -> None:
    with KeepAliveServer(drop_after=1) as server:
        fetch_bytes(server.url(), policy(server, kept))
        assert fetch_bytes(server.url(), policy(server, kept)).startswith(b"\x89PNG")
        # The second GET went out over the kept connection, was dropped unanswered, and was sent again on a new one.
        assert (server.connections, len(server.requests), kept.reused) == (2, 3, 1)


def test_a_new_connection_closed_unanswered_fails_the_fetch_once(kept: KeptConnections) -> None:
    with KeepAliveServer(drop_after=0) as server:
        with pytest.raises(UpstreamUnavailable) as caught:
            fetch_bytes(server.url(), policy(server, kept))
        assert caught.value.code == "connection_failed"
        assert server.connections == 1  # a new connection is not retried: only a kept one may have gone stale


def test_an_error_answer_closes_the_connection(host: KeepAliveServer, kept: KeptConnections) -> None:
    with pytest.raises(UpstreamUnavailable):
        fetch_bytes(host.url("/status/503"), policy(host, kept))
    assert len(kept) == 0
    fetch_bytes(host.url(), policy(host, kept))
    assert host.connections == 2


def test_a_kept_connection_still_ends_at_the_fetch_deadline(host: KeepAliveServer, kept: KeptConnections) -> None:
    fetch_bytes(host.url(), policy(host, kept))
    started = time.monotonic()
    with pytest.raises(FetchTimeout):
        fetch_bytes(host.url("/slow"), policy(host, kept, total_timeout_s=1.0))
    assert time.monotonic() - started < 2.5
    assert (host.connections, kept.reused, len(kept)) == (1, 1, 0)  # the slow answer came over the kept one, which is gone now


def test_connections_unused_for_idle_s_are_closed() -> None:
    clock = ManualClock()
    with KeepAliveServer() as server:
        kept = KeptConnections(idle_s=10, clock=clock)
        fetch_bytes(server.url(), policy(server, kept))
        clock.now += 11
        fetch_bytes(server.url(), policy(server, kept))
        assert (server.connections, kept.reused, len(kept)) == (2, 0, 1)
        kept.close()


def test_a_name_is_vetted_again_before_its_kept_connection_is_used(host: KeepAliveServer, fake_dns: FakeDNS, kept: KeptConnections) -> None:
    fake_dns.answers["images.test"] = [["127.0.0.1"], ["10.0.0.7"]]
    fetch_bytes(f"http://images.test:{host.port}/png", policy(host, kept))
    # The name now points at a private address: refused, and the connection to the old one stays unused.
    with pytest.raises(ImageRejected) as caught:
        fetch_bytes(f"http://images.test:{host.port}/png", policy(host, kept))
    assert caught.value.code == "blocked_address"
    assert (host.connections, kept.reused, len(kept)) == (1, 0, 1)


def test_two_names_of_one_address_do_not_share_a_connection(host: KeepAliveServer, fake_dns: FakeDNS, kept: KeptConnections) -> None:
    fake_dns.answers["a.test"] = fake_dns.answers["b.test"] = [["127.0.0.1"]]
    for name in ("a.test", "b.test", "a.test", "b.test"):
        fetch_bytes(f"http://{name}:{host.port}/png", policy(host, kept))
    assert (host.connections, kept.reused) == (2, 2)


def test_https_keeps_the_connection_and_its_handshake(tmp_path: Path, fake_dns: FakeDNS, kept: KeptConnections) -> None:
    cert, key = write_self_signed_cert(tmp_path, ["images.test"])
    seen_sni: list[str | None] = []
    with KeepAliveServer(tls_context=make_tls_context(cert, key, seen_sni=seen_sni)) as server:
        fake_dns.answers["images.test"] = [["127.0.0.1"]]
        for _ in range(3):
            assert fetch_bytes(server.url(host="images.test"), policy(server, kept, ca_bundle=cert)).startswith(b"\x89PNG")
        assert (server.connections, seen_sni, kept.reused) == (1, ["images.test"], 2)


class _Conn:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_the_caps_close_the_oldest_connections() -> None:
    clock = ManualClock()
    kept = KeptConnections(idle_s=60, per_key=2, most=3, clock=clock)
    conns = [_Conn() for _ in range(5)]
    keys = ["a", "a", "a", "b", "c"]  # a third for one key drops its oldest; a fourth in all drops the oldest anywhere
    for key, conn in zip(keys, conns, strict=True):
        kept.give(key, conn)  # type: ignore[arg-type]
        clock.now += 1
    assert [conn.closed for conn in conns] == [True, True, False, False, False]
    assert len(kept) == 3
    kept.close()
    assert all(conn.closed for conn in conns)
