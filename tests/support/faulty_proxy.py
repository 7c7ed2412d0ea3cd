"""A fault-injecting HTTP reverse proxy, put in front of the S3 API server by tests/reliability.

moto's server keeps its objects in memory, so an S3 outage cannot be made by restarting it.
Instead workers talk to this proxy, which is switched between modes:

* ``pass``: forward every request to the upstream server and relay its answer;
* ``refuse``: the listening socket is closed (new connections are refused, as with a host that
  is down) and requests arriving on kept-alive connections get the connection dropped;
* ``error``: answer every request ``503 ServiceUnavailable`` with an S3-style XML body.

``requests`` counts what each mode saw, so a test can check the fault was really hit.
"""

from __future__ import annotations

import http.client
import http.server
import threading
from collections import Counter
from typing import Literal
from urllib.parse import urlsplit

from worker.dev.services import free_port

Mode = Literal["pass", "refuse", "error"]

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>ServiceUnavailable</Code><Message>injected by faulty_proxy</Message></Error>"
)


class FaultyProxy:
    """Reverse proxy on a fixed loopback port; :meth:`set_mode` switches the fault."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.port = free_port()
        self.mode: Mode = "pass"
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultyProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="faulty-proxy", daemon=True)
        self._thread.start()
        return self

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            if mode == self.mode:
                return
            if mode == "refuse":
                self._close_listener()
            elif self.mode == "refuse":
                self.start()
            self.mode = mode

    def stop(self) -> None:
        self._close_listener()

    def _close_listener(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def count(self, mode: str) -> None:
        with self._lock:
            self.requests[mode] += 1


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    owner: FaultyProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 uses it

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        body = self._read_body()
        mode = self.owner.mode
        self.owner.count(mode)
        if mode == "refuse":
            self.close_connection = True  # drop it without an answer, like a host that went away
            return
        if mode == "error":
            self._answer(503, [("Content-Type", "application/xml")], _ERROR_BODY)
            return
        upstream = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=30)
        try:
            headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            # A HEAD answer keeps the upstream's Content-Length: it describes the object, not this empty body.
            dropped = _HOP_BY_HOP if self.command == "HEAD" else _HOP_BY_HOP | {"content-length"}
            relayed = [(name, value) for name, value in response.getheaders() if name.lower() not in dropped]
            self._answer(response.status, relayed, data)
        finally:
            upstream.close()

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
