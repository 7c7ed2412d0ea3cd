"""Real HTTP(S) servers on loopback that misbehave on purpose, for the image fetcher's tests.

``AbusiveServer`` is a threaded ``http.server`` on a free port with a fixed set of routes
(below). It counts TCP connections and requests, so a server the fetcher must never reach
(a "canary") can prove it was never reached. Bodies of any size are streamed from one
small buffer, never allocated. ``stop()`` wakes every sleeping handler and joins them.

Routes (GET):
    /png, /png-as-html           a valid PNG (the second with Content-Type: text/html)
    /gif-animated                a 3-frame GIF: red, green, blue
    /jpeg-truncated              the first half of a JPEG, with a matching Content-Length
    /html, /svg, /empty          an HTML page, an SVG document, a zero-byte body
    /gzip-bomb                   Content-Encoding: gzip, 64 MiB of zeros compressed
    /huge-declared               Content-Length: 1 GiB, then zeros
    /huge-undeclared             1 GiB of zeros delimited by connection close
    /endless-chunked             chunked zeros that never end
    /trickle                     Content-Length: 100, then one byte per second
    /trickle-undeclared          close-delimited, one byte per second
    /trickle-headers             the status line, then header bytes one per second
    /short-body                  Content-Length: 1000, 10 bytes, then close
    /status/<code>               that status, a short body
    /redirect?to=URL[&status=N]  a redirect (302 unless status given) to URL
    /redirect-no-location        a 302 without a Location header
    /loop                        302 to itself
    /chain/<n>                   302 to /chain/<n-1>; /chain/0 serves the PNG
    /reset                       a TCP reset instead of a response
    /echo                        200 with the request's headers as the body (text)
"""

from __future__ import annotations

import gzip
import http.server
import io
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.image_bytes import animated, encode, gradient, solid

GIB = 1024**3
_ZEROS = bytes(64 * 1024)


def png_bytes() -> bytes:
    return solid("PNG", (24, 16), (200, 30, 30))


def jpeg_bytes() -> bytes:
    return encode(gradient((64, 48)), "JPEG", quality=90)


def animated_gif_bytes() -> bytes:
    return animated("GIF")


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
HTML = b"<!DOCTYPE html><html><head><title>Not an image</title></head><body>Hello</body></html>"


class _Server(http.server.ThreadingHTTPServer):
    # Handlers are joined at server_close (block_on_close), and every one of them ends
    # promptly: on a write error, on the stop event, or on the per-connection timeout.
    daemon_threads = False
    block_on_close = True

    def __init__(self, owner: AbusiveServer, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self.owner = owner
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        with self.owner.lock:
            self.owner.connections += 1
        if self.owner.tls_context is not None:
            # Handshake in the handler thread, not in the accept loop.
            sock = self.owner.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up on abusive responses by design; that is not a test failure.
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 15  # seconds a blocked send may wait on a client that stopped reading
    server: _Server

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        split = urlsplit(self.path)
        with owner.lock:
            owner.requests.append((split.path, dict(self.headers.items())))
        self.close_connection = True
        route = split.path.strip("/").split("/")
        handler = _ROUTES.get(route[0])
        try:
            if handler is None:
                self._send(404, b"no such route", "text/plain")
            else:
                handler(self, route[1:], parse_qs(split.query))
        except OSError:
            pass  # the client went away, which is what these routes provoke

    # -- helpers -----------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/octet-stream", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _headers_only(self, status: int, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def _stopped(self) -> bool:
        return self.server.owner.stopping.is_set()

    def _stream_zeros(self, total: int | None, *, chunked: bool = False) -> None:
        sent = 0
        while (total is None or sent < total) and not self._stopped():
            block = _ZEROS if total is None else _ZEROS[: min(len(_ZEROS), total - sent)]
            if chunked:
                self.wfile.write(b"%x\r\n%b\r\n" % (len(block), block))
            else:
                self.wfile.write(block)
            sent += len(block)

    def _trickle(self, data: bytes, interval: float = 1.0) -> None:
        for index in range(len(data)):
            if self._stopped():
                return
            self.wfile.write(data[index : index + 1])
            self.wfile.flush()
            if self.server.owner.stopping.wait(interval):
                return

    # -- routes ------------------------------------------------------------------------

    def png(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(200, png_bytes(), "image/png")

    def png_as_html(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(200, png_bytes(), "text/html; charset=utf-8")

    def gif_animated(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(200, animated_gif_bytes(), "image/gif")

    def jpeg_truncated(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        data = jpeg_bytes()
        self._send(200, data[: len(data) // 2], "image/jpeg")

    def html(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(200, HTML, "image/png")  # lying on purpose: the type must not matter

    def svg(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(200, SVG, "image/svg+xml")

    def empty(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(200, b"", "image/png")

    def gzip_bomb(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(200, _gzip_bomb(), "image/png", Content_Encoding="gzip")

    def huge_declared(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._headers_only(200, Content_Type="image/png", Content_Length=str(GIB))
        self._stream_zeros(GIB)

    def huge_undeclared(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._headers_only(200, Content_Type="image/png")
        self._stream_zeros(GIB)

    def endless_chunked(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._headers_only(200, Content_Type="image/png", Transfer_Encoding="chunked")
        self._stream_zeros(None, chunked=True)

    def trickle(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._headers_only(200, Content_Type="image/png", Content_Length="100")
        self._trickle(png_bytes()[:100])

    def trickle_undeclared(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._headers_only(200, Content_Type="image/png")
        self._trickle(png_bytes())

    def trickle_headers(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        self._trickle(b"X-Slow: " + b"a" * 200 + b"\r\n\r\n")

    def short_body(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._headers_only(200, Content_Type="image/png", Content_Length="1000")
        self.wfile.write(png_bytes()[:10])

    def status(self, args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(int(args[0]), b"status body", "text/plain")

    def redirect(self, _args: list[str], query: dict[str, list[str]]) -> None:
        status = int(query.get("status", ["302"])[0])
        self._send(status, b"", "text/plain", Location=query["to"][0])

    def redirect_no_location(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(302, b"", "text/plain")

    def loop(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        self._send(302, b"", "text/plain", Location="/loop")

    def chain(self, args: list[str], _query: dict[str, list[str]]) -> None:
        left = int(args[0])
        if left <= 0:
            self.png([], {})
        else:
            self._send(302, b"", "text/plain", Location=f"/chain/{left - 1}")

    def reset(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP RST.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def echo(self, _args: list[str], _query: dict[str, list[str]]) -> None:
        lines = [f"{self.command} {self.path}"] + [f"{name}: {value}" for name, value in self.headers.items()]
        self._send(200, "\n".join(lines).encode(), "text/plain")


_ROUTES: dict[str, Callable[[_Handler, list[str], dict[str, list[str]]], None]] = {
    name.replace("_", "-"): getattr(_Handler, name)
    for name in (
        "png", "png_as_html", "gif_animated", "jpeg_truncated", "html", "svg", "empty", "gzip_bomb",
        "huge_declared", "huge_undeclared", "endless_chunked", "trickle", "trickle_undeclared",
        "trickle_headers", "short_body", "status", "redirect", "redirect_no_location", "loop",
        "chain", "reset", "echo",
    )
}

_gzip_cache: list[bytes] = []


def _gzip_bomb() -> bytes:
    if not _gzip_cache:
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as stream:
            for _ in range(64 * 16):
                stream.write(_ZEROS)
        _gzip_cache.append(out.getvalue())
    return _gzip_cache[0]


class AbusiveServer:
    """One misbehaving HTTP(S) server on loopback; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", *, tls_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.tls_context = tls_context
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _Server(self, (host, 0), family)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> AbusiveServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, path: str = "/png", *, scheme: str | None = None) -> str:
        scheme = scheme or ("https" if self.tls_context else "http")
        return f"{scheme}://{self.authority}{path}"

    @property
    def request_count(self) -> int:
        with self.lock:
            return len(self.requests)


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def make_tls_context(cert_path: str, key_path: str, *, seen_sni: list[str | None] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    if seen_sni is not None:

        def remember(_sock: Any, server_name: str | None, _context: Any) -> None:
            seen_sni.append(server_name)

        context.sni_callback = remember
    return context


def write_self_signed_cert(directory: Any, names: list[str]) -> tuple[str, str]:
    """A throwaway CA-less certificate for ``names``; returns (cert_path, key_path)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = f"{directory}/cert.pem"
    key_path = f"{directory}/key.pem"
    with open(cert_path, "wb") as out:
        out.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
