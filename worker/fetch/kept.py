"""Image-host connections kept open between fetches (HTTP keep-alive), per vetted address.

A bulk run's images mostly come from a few hosts (a CDN, a bucket's web endpoint). A new TCP
connection per image, and over https a TLS handshake per image, is CPU and round trips spent
again on every job (issue 14, the GPU host's CPU side): an https fetch of a bench JPEG cost
4.4 ms of CPU over a new connection and 0.65 ms over a kept one
(docs/benchmarks/queue-cost/fetch-keepalive).

A connection is kept only after a response that was read to its end and did not say
``Connection: close``, and only under the address :mod:`worker.fetch.netguard` vetted for it:
each fetch still parses, resolves and vets its URL, then takes a kept connection only for an
address that vetting allowed this time. A host whose name now points elsewhere never gets
an old connection, and a connection is never shared by two fetches at once. Kept ones are
closed once unused for ``idle_s``, when the host has closed them, or beyond the caps.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import NamedTuple

from urllib3.connection import HTTPConnection

from worker.fetch.netguard import IPAddress


class Key(NamedTuple):
    """What a kept connection may serve again: the same scheme, vetted address and port, and the same host name (Host, SNI, certificate)."""

    scheme: str
    address: IPAddress
    port: int
    host: str


class KeptConnections:
    """Idle connections by :class:`Key`, the most recently used taken first; thread-safe (the fetch threads share one)."""

    def __init__(self, *, idle_s: float, per_key: int = 8, most: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        if idle_s <= 0 or per_key < 1 or most < 1:
            raise ValueError("idle_s, per_key and most must be positive")
        self.idle_s = idle_s
        self.per_key = per_key
        self.most = most
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: dict[Key, list[tuple[float, HTTPConnection]]] = {}  # oldest first per key
        self.reused = 0  # fetches that went over a kept connection (the tests and the bench read it)
        # Whoever drops the last reference without close() (a policy built for one test) leaves no open socket behind.
        self._closer = weakref.finalize(self, _close_all, self._lock, self._idle)

    def take(self, key: Key) -> HTTPConnection | None:
        """A kept connection for ``key`` that the host has not closed, or None."""
        while True:
            with self._lock:
                expired = self._sweep()
                kept = self._idle.get(key)
                conn = None
                if kept:
                    _, conn = kept.pop()
                    if not kept:
                        del self._idle[key]
            _close(expired)
            if conn is None:
                return None
            # A host that closed the idle connection left it readable (EOF): a new one instead.
            # The host can still close it after this look; the fetch then retries once on a new one.
            if conn.is_connected:
                with self._lock:
                    self.reused += 1
                return conn
            conn.close()

    def give(self, key: Key, conn: HTTPConnection) -> None:
        """Keep ``conn`` (its response read to the end) for the next fetch of ``key``."""
        with self._lock:
            dropped = self._sweep()
            kept = self._idle.setdefault(key, [])
            kept.append((self._clock(), conn))
            if len(kept) > self.per_key:
                dropped.append(kept.pop(0)[1])
            while self._size() > self.most:
                dropped.append(self._drop_oldest())
        _close(dropped)

    def close(self) -> None:
        """Close every kept connection now; later fetches connect anew. (A worker leaves this to its exit, where the finalizer runs.)"""
        _close_all(self._lock, self._idle)

    def __len__(self) -> int:
        with self._lock:
            return self._size()

    def _size(self) -> int:
        return sum(len(kept) for kept in self._idle.values())

    def _sweep(self) -> list[HTTPConnection]:
        """Take out the connections unused for ``idle_s`` (the lock held); the caller closes them outside it."""
        limit = self._clock() - self.idle_s
        expired: list[HTTPConnection] = []
        for key in [key for key, kept in self._idle.items() if kept[0][0] <= limit]:
            kept = self._idle[key]
            while kept and kept[0][0] <= limit:
                expired.append(kept.pop(0)[1])
            if not kept:
                del self._idle[key]
        return expired

    def _drop_oldest(self) -> HTTPConnection:
        key = min(self._idle, key=lambda k: self._idle[k][0][0])
        kept = self._idle[key]
        _, conn = kept.pop(0)
        if not kept:
            del self._idle[key]
        return conn


def _close_all(lock: threading.Lock, idle: dict[Key, list[tuple[float, HTTPConnection]]]) -> None:
    with lock:
        conns = [conn for kept in idle.values() for _, conn in kept]
        idle.clear()
    _close(conns)


def _close(conns: list[HTTPConnection]) -> None:
    for conn in conns:
        conn.close()
