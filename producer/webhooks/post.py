"""One webhook POST: the image fetcher's SSRF guard (worker/fetch/netguard.py), no redirects, a total deadline, a response cap.

Webhook URLs are untrusted input like image URLs: parsed once, resolved once, refused when any
address is internal (unless VQA_ALLOWED_HOSTS allows it), and the connection goes to the vetted
address itself. A 3xx is an answer like any other non-2xx: it is never followed.
"""

from __future__ import annotations

import time
from http.client import HTTPException

import urllib3.exceptions
from urllib3.connection import HTTPConnection, HTTPSConnection

from producer.errors import ImageRejected, UpstreamUnavailable, WebhookRefused
from worker.fetch import netguard
from worker.fetch.deadlines import Watchdog

_CHUNK = 16 * 1024
_TRANSPORT_ERRORS = (OSError, HTTPException, urllib3.exceptions.HTTPError)


def post(
    url: str, body: bytes, headers: dict[str, str], *, rules: netguard.HostRules, timeout_s: float, connect_timeout_s: float,
    max_response_bytes: int,
) -> int:
    """POST ``body`` to ``url``; return the HTTP status. Raises WebhookRefused (never retried) or UpstreamUnavailable."""
    deadline = time.monotonic() + timeout_s
    try:
        target = netguard.parse_http_url(url)
        addresses = netguard.vet(target, rules, timeout=timeout_s)
    except ImageRejected as exc:
        raise WebhookRefused(f"webhook URL refused: {exc.message.replace('image ', '')}", code=exc.code) from exc
    except UpstreamUnavailable:
        raise
    failure: Exception | None = None
    for ip in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if target.scheme == "https":
            conn: HTTPConnection = HTTPSConnection(str(ip), target.port, timeout=min(connect_timeout_s, left),
                                                   server_hostname=target.host, cert_reqs="CERT_REQUIRED")
        else:
            conn = HTTPConnection(str(ip), target.port, timeout=min(connect_timeout_s, left))
        try:
            with Watchdog(conn, deadline) as watchdog:
                try:
                    conn.connect()
                    watchdog.pin(conn.sock)
                    conn.timeout = max(watchdog.remaining(), 0.001)
                    conn.request("POST", target.request_target, body=body,
                                 headers={**headers, "Host": target.host_header, "Content-Type": "application/json",
                                          "User-Agent": "vqa-webhooks", "Accept-Encoding": "identity"},
                                 preload_content=False, decode_content=False)
                    response = conn.getresponse()
                    try:
                        read = 0
                        # Drained up to the cap only: the answer's body means nothing to us.
                        while read <= max_response_bytes and (chunk := response.read(_CHUNK, decode_content=False)):
                            read += len(chunk)
                    finally:
                        watchdog.disarm()
                        response.close()
                    if watchdog.expired:
                        raise UpstreamUnavailable(f"webhook {netguard.show(url)} did not answer within {timeout_s:g}s", code="timeout")
                    return int(response.status)
                except _TRANSPORT_ERRORS as exc:
                    if watchdog.expired:
                        raise UpstreamUnavailable(f"webhook {netguard.show(url)} did not answer within {timeout_s:g}s", code="timeout") from exc
                    failure = exc
        finally:
            conn.close()
    raise UpstreamUnavailable(f"could not deliver to {netguard.show(url)}: {failure or 'deadline passed'}", code="connection_failed")
