"""A TCP proxy that can cut one worker off from Redis: a network partition, not a Redis outage.

``stall()`` stops forwarding in both directions while keeping every connection open, as a
partition does (no reset, no refusal: the worker's commands simply get no answer); what arrives
meanwhile is held. ``resume()`` forwards the held bytes and goes on, as TCP retransmission does
when the network heals: the worker's late commands then reach Redis.
"""

from __future__ import annotations

import socket
import threading

from worker.dev.services import free_port


class PartitionProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_port``; :meth:`stall` and :meth:`resume` switch the partition."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()  # stop() and a connection accepted meanwhile: every socket is closed once

    def start(self) -> PartitionProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def stop(self) -> None:
        with self._lock:
            self._closed.set()
            self._flowing.set()
            for sock in [self._listener, *self._sockets]:
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._flowing.wait()  # a partition refuses nothing; the connection just waits
            if self._closed.is_set():
                client.close()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # upstream gone (a killed Redis): the client sees its connection closed
                client.close()
                continue
            with self._lock:
                if self._closed.is_set():  # stopped while connecting: nobody else would close these
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                self._flowing.wait()  # held while stalled
                if not data or self._closed.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
