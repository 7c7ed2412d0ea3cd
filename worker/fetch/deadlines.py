"""Every fetch's total deadline, kept by one thread: at the deadline the connection's socket is shut down.

Socket timeouts bound each recv, not their sum: a server trickling one byte a second never
trips them. A shut socket makes every blocked call return at once, so no read or handshake
outlives the deadline.

One long-lived thread watches all armed deadlines (a heap, nearest first) instead of a thread
per fetch: starting and joining a thread costs about 0.2 ms of CPU, on every job (issue 14;
docs/benchmarks/queue-cost/s3-put).
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from types import TracebackType
from typing import Any

# At the deadline the TCP connect may still be in flight, with no socket yet: look again this soon.
_RESHUT_S = 0.05


class Watchdog:
    """One exchange's deadline: ``with Watchdog(conn, deadline) as watchdog:`` arms it, leaving (or :meth:`disarm`) ends it.

    ``conn`` is an http.client/urllib3 connection; its socket (or the one :meth:`pin` names)
    is shut at the deadline and ``expired`` set. After :meth:`disarm` returns the socket is
    never touched again, so it can be closed (and its descriptor reused) safely.
    """

    def __init__(self, conn: Any, deadline: float) -> None:
        self._conn = conn
        self._deadline = deadline
        self._sock: socket.socket | None = None
        self._disarmed = False
        self.expired = False

    def __enter__(self) -> Watchdog:
        _WATCHER.arm(self, self._deadline)
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.disarm()

    def pin(self, sock: socket.socket) -> None:
        """Watch ``sock`` from now on: http.client drops ``conn.sock`` once a response says
        ``Connection: close``, although the response keeps reading from the same socket."""
        self._sock = sock

    def disarm(self) -> None:
        """End the watch; call before closing the socket it watches."""
        with _WATCHER.lock:
            self._disarmed = True
            # The watcher keeps the entry until its time comes: it must not keep the connection alive.
            self._conn = self._sock = None

    def remaining(self) -> float:
        return self._deadline - time.monotonic()

    def _fire(self) -> bool:
        """At the deadline (the watcher's lock held): shut the socket; True while it should be shut again later."""
        if self._disarmed:
            return False
        self.expired = True
        sock = self._sock or getattr(self._conn, "sock", None)
        if sock is not None:
            try:
                # socket.socket's own shutdown, not SSLSocket's, which would also unwrap TLS
                # state the reading thread is using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        return True


class _Watcher:
    """The thread behind every :class:`Watchdog`: sleeps until the nearest armed deadline."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self._heap: list[tuple[float, int, Watchdog]] = []
        self._order = itertools.count()  # ties on the deadline never compare watchdogs
        self._thread: threading.Thread | None = None

    def arm(self, watchdog: Watchdog, at: float) -> None:
        with self.lock:
            heapq.heappush(self._heap, (at, next(self._order), watchdog))
            if self._thread is None or not self._thread.is_alive():
                # Started on first use (and again in a forked child, where the parent's thread is gone).
                self._thread = threading.Thread(target=self._run, name="vqa-fetch-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watchdog:
                self.lock.notify()  # a nearer deadline than the one the thread sleeps towards

    def _run(self) -> None:
        with self.lock:
            while True:
                # Disarmed watches are dropped as they surface: the heap holds only live ones and
                # those whose deadline has not come yet.
                while self._heap and self._heap[0][2]._disarmed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self.lock.wait()
                    continue
                at, _, watchdog = self._heap[0]
                now = time.monotonic()
                if now < at:
                    self.lock.wait(at - now)
                    continue
                heapq.heappop(self._heap)
                if watchdog._fire():
                    heapq.heappush(self._heap, (now + _RESHUT_S, next(self._order), watchdog))


_WATCHER = _Watcher()
