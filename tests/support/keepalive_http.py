"""An image host that keeps connections alive (HTTP/1.1), as CDNs and S3 do, and counts them; some routes end them rudely.

    /png            a PNG, the connection kept open
    /close          a PNG with ``Connection: close``
    /hangup         a PNG that says nothing of closing, then the server closes (an idle timeout of zero)
    /status/<code>  that status with a short body, the connection kept open
    /slow           a PNG sent one byte a second

``drop_after``: on a connection that has answered that many requests, the next one is read
and the connection closed without an answer (a host's idle timeout firing as the request
arrives, which no look before sending can see).
"""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from typing import Any

from tests.support.abusive_http import png_bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle kept connection the client forgot ends with this
    server: _Server

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        self.answered = 0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(self.path)
        if owner.drop_after is not None and self.answered >= owner.drop_after:
            self.close_connection = True
            return
        self.answered += 1
        route = self.path.strip("/").split("/")
        try:
            if route[0] == "png":
                self._send(200, png_bytes())
            elif route[0] == "close":
                self._send(200, png_bytes(), Connection="close")
                self.close_connection = True
            elif route[0] == "hangup":
                self._send(200, png_bytes())
                self.close_connection = True
            elif route[0] == "status":
                self._send(int(route[1]), b"not now")
            elif route[0] == "slow":
                self.send_response(200)
                self.send_header("Content-Length", str(len(png_bytes())))
                self.end_headers()
                for index, byte in enumerate(png_bytes()):
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    if owner.stopping.wait(1.0) or index > 20:
                        break
                self.close_connection = True
            else:
                self._send(404, b"no such route")
        except OSError:
            self.close_connection = True

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png" if status == 200 else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a connection a client keeps idle must not hold up stop()

    def __init__(self, owner: KeepAliveServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        with self.owner.lock:
            self.owner.connections += 1
            self.owner.open_sockets.append(sock)
        if self.owner.tls_context is not None:
            sock = self.owner.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class KeepAliveServer:
    """Use as a context manager; ``connections`` counts the TCP connections it accepted, ``requests`` the paths asked for."""

    def __init__(self, *, tls_context: ssl.SSLContext | None = None, drop_after: int | None = None) -> None:
        self.tls_context = tls_context
        self.drop_after = drop_after
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.connections = 0
        self.requests: list[str] = []
        self.open_sockets: list[socket.socket] = []
        self._server = _Server(self)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> KeepAliveServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            for sock in self.open_sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._thread.join()

    def url(self, path: str = "/png", *, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls_context else 'http'}://{host}:{self.port}{path}"
