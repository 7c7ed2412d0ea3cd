"""The fetch's shared threads: one deadline watcher for every exchange, and the DNS lookup threads.

Both replaced a thread started per fetch (issue 14); these check what the per-fetch threads
guaranteed: a deadline shuts its socket at the deadline and a disarmed one never touches it,
and a lookup that hangs holds up no other lookup.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from producer.errors import FetchTimeout
from worker.fetch import netguard
from worker.fetch.deadlines import Watchdog

pytestmark = pytest.mark.timeout(30)


@pytest.fixture()
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for left, right in made:
        left.close()
        right.close()


def _connection(pairs: list[tuple[socket.socket, socket.socket]]) -> tuple[Any, socket.socket]:
    left, right = socket.socketpair()
    pairs.append((left, right))
    return SimpleNamespace(sock=left), right


def test_each_deadline_shuts_its_own_socket_at_its_time(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    start = time.monotonic()
    # Armed out of order: the watcher must wake for the nearest one, not the first armed.
    # The peers stay open: only the watcher's shutdown can end the reads below.
    late_conn, _ = _connection(pairs)
    early_conn, _ = _connection(pairs)
    late = Watchdog(late_conn, start + 0.6).__enter__()
    early = Watchdog(early_conn, start + 0.2).__enter__()

    early_conn.sock.settimeout(5)
    assert early_conn.sock.recv(1) == b""  # a blocked read returns once the socket is shut
    woke = time.monotonic() - start
    assert 0.15 <= woke < 0.5, woke
    assert early.expired and not late.expired

    late_conn.sock.settimeout(5)
    assert late_conn.sock.recv(1) == b""
    assert 0.55 <= time.monotonic() - start < 1.5
    assert late.expired
    early.disarm()
    late.disarm()


def test_a_disarmed_deadline_never_touches_its_socket(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    conns = [_connection(pairs) for _ in range(50)]
    deadline = time.monotonic() + 0.2
    for conn, _peer in conns:
        with Watchdog(conn, deadline) as watchdog:
            pass
        assert not watchdog.expired
    time.sleep(0.4)  # past every deadline
    for conn, peer in conns:
        peer.sendall(b"x")
        conn.sock.settimeout(2)
        assert conn.sock.recv(1) == b"x"  # still open both ways


def test_a_hung_lookup_does_not_hold_up_another(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "hung.test":
            release.wait(20)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "quick.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        for _ in range(3):  # each hung lookup keeps a thread busy; the next lookup gets another
            start = time.monotonic()
            with pytest.raises(FetchTimeout):
                netguard.resolve("hung.test", 80, timeout=0.2)
            assert time.monotonic() - start < 1.0
        start = time.monotonic()
        assert [str(ip) for ip in netguard.resolve("quick.test", 80, timeout=2.0)] == ["203.0.113.7"]
        assert time.monotonic() - start < 1.0
    finally:
        release.set()


def test_an_address_is_not_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[Any] = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or real(host, *a, **k))
    assert [str(ip) for ip in netguard.resolve("198.51.100.4", 443, timeout=1.0)] == ["198.51.100.4"]
    assert [str(ip) for ip in netguard.resolve("2001:db8::1", 443, timeout=1.0)] == ["2001:db8::1"]
    assert looked_up == []
    # An odd spelling is read by getaddrinfo, as before: judged by what it resolves to.
    assert [str(ip) for ip in netguard.resolve("2130706433", 80, timeout=1.0)] == ["127.0.0.1"]
    assert looked_up == ["2130706433"]
