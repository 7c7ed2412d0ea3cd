"""Move an image's bytes: one http(s) or S3 fetch under a total deadline and a byte cap.

HTTP goes through urllib3's ``HTTPConnection`` pointed at an address that
:mod:`worker.fetch.netguard` vetted, with the original ``Host`` header and, for https, the
original name for SNI and certificate checks, or over a connection kept from an earlier
fetch to that same vetted address and name (:mod:`worker.fetch.kept`). Redirects are
followed by hand so every hop is parsed, resolved and vetted again. The body is read in
chunks and dropped at the cap, so memory stays at most ``max_bytes`` whatever the server
sends. urllib3, http.client, ssl and botocore errors are translated here into
:mod:`producer.errors`.
"""

from __future__ import annotations

import functools
import socket
import ssl
import time
from dataclasses import dataclass
from http.client import HTTPException, RemoteDisconnected
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import urllib3.exceptions
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util.ssl_ import create_urllib3_context
from urllib3.util.ssl_match_hostname import CertificateError

from producer.errors import FetchTimeout, ImageRejected, StorageUnavailable, UpstreamUnavailable, VQAError
from worker.fetch import netguard
from worker.fetch.deadlines import Watchdog
from worker.fetch.kept import Key
from worker.fetch.netguard import IPAddress, Target, show

if TYPE_CHECKING:
    from worker.fetch.images import FetchPolicy

_CHUNK = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Client-error statuses that still mean "the same request may work later".
_RETRYABLE_4XX = frozenset({408, 425, 429})
_TRANSPORT_ERRORS = (OSError, HTTPException, urllib3.exceptions.HTTPError, CertificateError)


@dataclass(frozen=True)
class _Redirect:
    location: str


def fetch_http(url: str, policy: FetchPolicy, *, deadline: float) -> bytes:
    """GET ``url``, following at most ``policy.max_redirects`` vetted redirects, before ``deadline``."""
    current = url
    for _hop in range(policy.max_redirects + 1):
        target = netguard.parse_http_url(current)
        addresses = netguard.vet(target, policy.host_rules, timeout=_remaining(deadline, current, policy))
        outcome = _exchange(target, addresses, policy, deadline, url=current)
        if isinstance(outcome, bytes):
            return outcome
        current = urljoin(current, outcome.location)
    raise ImageRejected(
        f"image URL {show(url)!r} redirected more than {policy.max_redirects} times", code="too_many_redirects"
    )


def _remaining(deadline: float, url: str, policy: FetchPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timeout(url, policy)
    return left


def _timeout(url: str, policy: FetchPolicy) -> FetchTimeout:
    return FetchTimeout(f"fetching {show(url)} took longer than {policy.total_timeout_s:g}s", code="timeout")


def _exchange(
    target: Target, addresses: list[IPAddress], policy: FetchPolicy, deadline: float, *, url: str
) -> bytes | _Redirect:
    """One request/response with the first vetted address that accepts a connection (a kept one first, where there is one)."""
    failure: Exception | None = None
    for ip in addresses:
        key = Key(target.scheme, ip, target.port, target.host)
        kept = policy.connections.take(key) if policy.connections is not None else None
        if kept is not None:
            try:
                return _request(kept, key, target, policy, deadline, url=url, reused=True)
            except _Stale:
                pass  # the host closed it as we sent (its idle timeout): once more, on a new connection
        left = _remaining(deadline, url, policy)
        conn = _connection(target, ip, policy, timeout=min(policy.connect_timeout_s, left))
        try:
            return _request(conn, key, target, policy, deadline, url=url, reused=False)
        except _Unreachable as exc:
            failure = exc.error  # refused/unreachable: the host's next address may answer
    assert failure is not None  # vet() never returns an empty list
    raise _translate(failure, expired=False, url=url, policy=policy) from failure


class _Unreachable(Exception):
    """A new connection was refused or could not be made (not a certificate error, not the deadline)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Stale(Exception):
    """A kept connection the host had closed: nothing of an answer came back, so the GET is sent again on a new one."""


# What a request over a connection the host closed meanwhile raises before any answer.
_CLOSED_BY_HOST = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, RemoteDisconnected)


def _request(
    conn: HTTPConnection, key: Key, target: Target, policy: FetchPolicy, deadline: float, *, url: str, reused: bool
) -> bytes | _Redirect:
    """One exchange over ``conn`` (connected here unless ``reused``); the connection is kept afterwards where it may serve again."""
    keep = False
    watchdog = Watchdog(conn, deadline)
    try:
        # The watchdog is disarmed before any close, so it never shuts a reused descriptor.
        with watchdog:
            try:
                if not reused:
                    try:
                        conn.connect()
                    except _TRANSPORT_ERRORS as exc:
                        if watchdog.expired or _is_certificate_error(exc):
                            raise
                        raise _Unreachable(exc) from exc
                watchdog.pin(conn.sock)
                outcome, keep = _talk(conn, target, policy, watchdog, url=url, reused=reused)
                return outcome
            except (VQAError, _Unreachable, _Stale):
                raise
            except _TRANSPORT_ERRORS as exc:
                raise _translate(exc, expired=watchdog.expired, url=url, policy=policy) from exc
    finally:
        # Leaving the block disarmed the watchdog: ``expired`` is final here.
        if keep and not watchdog.expired and policy.connections is not None:
            policy.connections.give(key, conn)
        else:
            conn.close()


def _connection(target: Target, ip: IPAddress, policy: FetchPolicy, *, timeout: float) -> HTTPConnection:
    # Connect to the vetted address itself: no second DNS lookup that could answer differently.
    if target.scheme == "https":
        return HTTPSConnection(
            str(ip),
            target.port,
            timeout=timeout,
            server_hostname=target.host,  # SNI and the name the certificate must match
            cert_reqs="CERT_REQUIRED",
            ssl_context=tls_context(policy.ca_bundle),
        )
    return HTTPConnection(str(ip), target.port, timeout=timeout)


@functools.lru_cache(maxsize=8)
def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The one TLS client context per trust store, shared by every https fetch of the process.

    Left to itself urllib3 builds a context per connection and loads the trust store into it:
    the system's costs 26 ms of CPU each time (docs/benchmarks/queue-cost/fetch-keepalive).
    The context verifies the chain and the host name (urllib3's defaults for CERT_REQUIRED);
    a trust store changed on disk is read at the worker's next start.
    """
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    else:
        context.load_default_certs()
    return context


def _talk(
    conn: HTTPConnection, target: Target, policy: FetchPolicy, watchdog: Watchdog, *, url: str, reused: bool
) -> tuple[bytes | _Redirect, bool]:
    """The GET and its answer; True beside it when the connection may serve another request (the body read to its end, no ``Connection: close``)."""
    # Per-recv timeout; the watchdog bounds their sum.
    conn.timeout = max(watchdog.remaining(), 0.001)
    if reused:
        conn.sock.settimeout(conn.timeout)  # connect() set it on a new one
    try:
        conn.request(
            "GET",
            target.request_target,
            headers={
                "Host": target.host_header,
                "User-Agent": policy.user_agent,
                "Accept": "image/*",
                # Compressed bodies would expand past the byte cap after it was checked.
                "Accept-Encoding": "identity",
            },
            preload_content=False,
            decode_content=False,
        )
        if reused:
            _ack_at_once(conn.sock)
        response = conn.getresponse()
    except _CLOSED_BY_HOST as exc:
        if reused and not watchdog.expired:
            raise _Stale() from exc
        raise
    try:
        status = response.status
        if status in _REDIRECTS:
            location = response.headers.get("Location")
            if not location:
                raise ImageRejected(f"image host answered HTTP {status} without a Location for {show(url)}", code="http_status")
            return _Redirect(location), False
        if status >= 500 or status in _RETRYABLE_4XX:
            raise UpstreamUnavailable(f"image host answered HTTP {status} for {show(url)}; try again later", code="http_status")
        if not 200 <= status < 300:
            raise ImageRejected(f"image host answered HTTP {status} {response.reason} for {show(url)}", code="http_status")
        declared = response.length_remaining
        if declared is not None and declared > policy.max_bytes:
            raise _too_large(url, policy, declared=declared)
        body = bytearray()
        while chunk := response.read(_CHUNK, decode_content=False):
            body += chunk
            if len(body) > policy.max_bytes:
                raise _too_large(url, policy)
        # A close-delimited body ends with EOF, and so does a socket the watchdog shut.
        if watchdog.expired:
            raise _timeout(url, policy)
        # http.client drops conn.sock when the answer says "Connection: close" (or is close-delimited).
        return bytes(body), conn.sock is not None and _read_to_end(response)
    finally:
        watchdog.disarm()
        response.close()


def _ack_at_once(sock: Any) -> None:
    """Acknowledge the answer's first segment at once (Linux's TCP_QUICKACK, elsewhere nothing).

    On a kept connection Linux delays ACKs, hoping to send them with our next request. A host
    that writes headers and body separately without TCP_NODELAY (Python's http.server does)
    then holds the body back until that ACK: about 40 ms per image.
    """
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        except OSError:
            pass


def _read_to_end(response: Any) -> bool:
    """The answer is over and did not ask to close: the next request may follow on the same connection."""
    original = response._original_response  # http.client's, which knows "Connection: close"
    return original is not None and original.isclosed() and not original.will_close


def _too_large(url: str, policy: FetchPolicy, *, declared: int | None = None) -> ImageRejected:
    size = f"{declared:,} bytes" if declared is not None else f"more than {policy.max_bytes:,} bytes"
    return ImageRejected(
        f"image at {show(url)} is {size}; the limit is {policy.max_bytes:,} bytes; send a smaller file",
        code="too_large",
    )


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ssl.SSLCertVerificationError, CertificateError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _translate(exc: BaseException, *, expired: bool, url: str, policy: FetchPolicy) -> VQAError:
    if expired:
        return _timeout(url, policy)
    if _is_certificate_error(exc):
        return ImageRejected(f"the TLS certificate of {show(url)} does not verify: {exc}", code="tls_error")
    if isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError)) and not isinstance(
        exc, urllib3.exceptions.NewConnectionError
    ):
        return FetchTimeout(f"image host did not answer in time for {show(url)}", code="timeout")
    return UpstreamUnavailable(f"could not fetch {show(url)}: {exc}", code="connection_failed")


# --------------------------------------------------------------------------- S3

# S3 error codes that mean "try again later" even when the HTTP status says 4xx.
_S3_TRANSIENT = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException"})


def fetch_s3(url: str, policy: FetchPolicy, *, s3_client: Any, deadline: float) -> bytes:
    """Read ``s3://bucket/key`` (bucket in ``policy.allowed_s3_buckets``) through ``s3_client``."""
    bucket, key = _parse_s3_url(url)
    if bucket not in policy.allowed_s3_buckets:
        raise ImageRejected(f"images cannot be read from S3 bucket {bucket!r}; it is not an image bucket", code="blocked_address")
    if s3_client is None:
        raise ImageRejected("s3:// image URLs are not enabled on this worker", code="bad_scheme")
    # Here, not at the top: fetching over http needs no AWS SDK (bench.preprocess runs on a GPU
    # host that has none); an s3_client means botocore is there.
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"s3://{bucket}/{key}"
    try:
        response = s3_client.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = error.get("Code", "unknown")
        if code in _S3_TRANSIENT or status >= 500 or status == 429:
            raise StorageUnavailable(f"S3 could not serve {show(where)} right now ({code})") from exc
        raise ImageRejected(f"S3 refused {show(where)}: {code} ({error.get('Message', 'no message')})", code="http_status") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"S3 is unreachable for {show(where)}: {exc}") from exc
    body = response["Body"]
    try:
        declared = response.get("ContentLength")
        if declared is not None and declared > policy.max_bytes:
            raise _too_large(where, policy, declared=declared)
        data = bytearray()
        while chunk := body.read(_CHUNK):
            data += chunk
            if len(data) > policy.max_bytes:
                raise _too_large(where, policy)
            # The S3 endpoint is ours, not an adversary's: a check between chunks suffices.
            if time.monotonic() > deadline:
                raise StorageUnavailable(f"reading {show(where)} from S3 took longer than {policy.total_timeout_s:g}s")
        return bytes(data)
    except (BotoCoreError, OSError, urllib3.exceptions.HTTPError) as exc:
        raise StorageUnavailable(f"S3 connection broke while reading {show(where)}: {exc}") from exc
    finally:
        body.close()


def _parse_s3_url(url: str) -> tuple[str, str]:
    # Keys are taken verbatim (as the AWS CLI does): "?" and "#" are legal in S3 keys.
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key or any(ord(ch) < 0x20 or ch == "\x7f" for ch in url):
        raise ImageRejected(f"image URL {show(url)!r} is not of the form s3://bucket/key", code="bad_url")
    return bucket, key
