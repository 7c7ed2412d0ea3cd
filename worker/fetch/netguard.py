"""Where an image fetch may connect: URL parsing, one DNS resolution, address vetting.

Image URLs come from untrusted users, and workers sit next to Redis, MinIO and cloud
metadata services. The rule: parse the URL once with one parser, resolve its host once,
refuse if *any* resolved address is not publicly routable (unless an operator listed it in
``allowed_hosts``), and hand the caller the vetted addresses to connect to. The HTTP client
then connects to those addresses, never to the name, so a DNS answer that changes between
"check" and "use" (rebinding) cannot redirect the connection, and odd spellings of an
address (``2130706433``, ``0x7f.1``, ``[::ffff:127.0.0.1]``) are judged by what they
resolve to rather than by how they look.
"""

from __future__ import annotations

import ipaddress
import queue
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from producer.errors import FetchTimeout, ImageRejected, UpstreamUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_URL_LENGTH = 8192
# Whitespace, control characters and backslashes are where URL parsers disagree (WHATWG
# turns "\" into "/", urllib keeps it); refusing them keeps exactly one reading of the URL.
_AMBIGUOUS_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")
# RFC 3986 characters that may stay as they are in a path or query; "%" keeps existing escapes.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


def _net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


# Checked before the stdlib flags so refusals name the specific range.
_BLOCKED_V4: tuple[tuple[IPNetwork, str], ...] = (
    (_net("0.0.0.0/8"), "'this network' (0.0.0.0/8, reaches localhost on Linux)"),
    (_net("10.0.0.0/8"), "private (RFC 1918)"),
    (_net("100.64.0.0/10"), "carrier-grade NAT (100.64.0.0/10)"),
    (_net("127.0.0.0/8"), "loopback"),
    (_net("169.254.0.0/16"), "link-local (cloud metadata lives here)"),
    (_net("172.16.0.0/12"), "private (RFC 1918)"),
    (_net("192.0.0.0/24"), "IETF protocol assignment"),
    (_net("192.0.2.0/24"), "documentation"),
    (_net("192.88.99.0/24"), "6to4 relay anycast"),
    (_net("192.168.0.0/16"), "private (RFC 1918)"),
    (_net("198.18.0.0/15"), "benchmarking"),
    (_net("198.51.100.0/24"), "documentation"),
    (_net("203.0.113.0/24"), "documentation"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("255.255.255.255/32"), "broadcast"),
    (_net("240.0.0.0/4"), "reserved"),
)
_BLOCKED_V6: tuple[tuple[IPNetwork, str], ...] = (
    (_net("::/128"), "unspecified"),
    (_net("::1/128"), "loopback"),
    (_net("::/96"), "IPv4-compatible (deprecated)"),
    (_net("64:ff9b:1::/48"), "local-use NAT64"),
    (_net("100::/64"), "discard-only"),
    (_net("2001::/32"), "Teredo tunnel"),
    (_net("2001:db8::/32"), "documentation"),
    (_net("3fff::/20"), "documentation"),
    (_net("5f00::/16"), "segment-routing"),
    (_net("fc00::/7"), "unique-local (private)"),
    (_net("fe80::/10"), "link-local"),
    (_net("fec0::/10"), "site-local (deprecated)"),
    (_net("ff00::/8"), "multicast"),
)
_NAT64 = _net("64:ff9b::/96")


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted, or None when it is publicly routable."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address inside reach that IPv4 address in the end
        # (through the kernel, a NAT64 gateway or a 6to4 relay), so the inner one decides.
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            inner = blocked_reason(embedded)
            if inner is not None:
                return f"{inner} (embedded in {ip})"
            if ip.ipv4_mapped is not None or ip in _NAT64:
                return None
        table = _BLOCKED_V6
    else:
        table = _BLOCKED_V4
    for network, reason in table:
        if ip in network:
            return reason
    # Belt and braces for ranges the tables above forget: the stdlib's own registry.
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global:
        return "non-global"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    # Teredo (2001::/32) also embeds IPv4 endpoints, but it is refused whole (table below):
    # the relay it needs is obsolete and the client address is obfuscated.
    return None


def canonical(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 becomes plain IPv4: the same destination, one spelling to compare."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


@dataclass(frozen=True)
class Target:
    """One parsed http(s) URL: the host to vet, the port, and the request line's target."""

    scheme: str
    host: str  # lowercase ASCII (IDNA) name, or an IP literal without brackets
    port: int
    request_target: str  # percent-encoded path and query, never empty

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def show(url: str, limit: int = 200) -> str:
    """A URL short enough to put in an error message."""
    return url if len(url) <= limit else url[: limit - 3] + "..."


def parse_http_url(url: str) -> Target:
    """Parse an http(s) URL the one way this worker reads it, or raise ImageRejected."""
    if len(url) > _MAX_URL_LENGTH:
        raise ImageRejected(f"image URL is longer than {_MAX_URL_LENGTH} characters", code="bad_url")
    if _AMBIGUOUS_CHARS.search(url):
        raise ImageRejected(
            f"image URL {show(url)!r} contains whitespace, control characters or a backslash; "
            "percent-encode them",
            code="bad_url",
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ImageRejected(f"image URL {show(url)!r} is malformed: {exc}", code="bad_url") from exc
    if parts.scheme not in ("http", "https"):
        raise ImageRejected(
            f"image URL {show(url)!r} must use http, https or s3, not {parts.scheme or 'no scheme'!r}",
            code="bad_scheme",
        )
    # The host is whatever follows the last "@" (urlsplit agrees); userinfo is dropped and
    # never forwarded.
    bracketed = parts.netloc.rpartition("@")[2].startswith("[")
    host = _normalize_host(parts.hostname or "", bracketed=bracketed, url=url)
    if port == 0:
        raise ImageRejected(f"image URL {show(url)!r} names port 0", code="bad_url")
    target = quote(parts.path or "/", safe=_PATH_SAFE)
    if not target.startswith("/"):
        target = "/" + target
    if parts.query:
        target += "?" + quote(parts.query, safe=_QUERY_SAFE)
    return Target(
        scheme=parts.scheme,
        host=host,
        port=port if port is not None else (443 if parts.scheme == "https" else 80),
        request_target=target,
    )


def _normalize_host(host: str, *, bracketed: bool, url: str) -> str:
    if not host:
        raise ImageRejected(f"image URL {show(url)!r} has no host", code="bad_url")
    if bracketed:
        try:
            # A zone id ("%25eth0") only means something for link-local, which is refused anyway.
            return str(ipaddress.IPv6Address(host.split("%", 1)[0]))
        except ValueError as exc:
            raise ImageRejected(f"image URL {show(url)!r} has a malformed IPv6 host", code="bad_url") from exc
    try:
        # The same IDNA codec the socket module uses, so "１２７.０.０.１" becomes "127.0.0.1"
        # here, before vetting, not later inside getaddrinfo.
        ascii_host = host.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ImageRejected(f"image URL {show(url)!r} has an invalid host name", code="bad_url") from exc
    # "localhost." is the same name as "localhost"; one spelling for allowed_hosts to match.
    ascii_host = ascii_host.rstrip(".")
    if not _HOSTNAME.match(ascii_host):
        raise ImageRejected(f"image URL {show(url)!r} has an invalid host name", code="bad_url")
    return ascii_host


@dataclass(frozen=True)
class _Rule:
    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches(self, host: str, port: int, ip: IPAddress) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.name is not None:
            return self.name == host
        assert self.network is not None
        return ip.version == self.network.version and ip in self.network


class HostRules:
    """The operator's exceptions to the private-address block (``Settings.allowed_hosts``).

    Entries: a host name (``minio``), host:port (``127.0.0.1:8080``, ``[::1]:9000``,
    ``minio:9000``), an address, or a CIDR (``10.0.0.0/8``). A name matches the URL's host
    name, whatever it resolves to; an address or CIDR matches the resolved address, however
    the URL spelled it.
    """

    def __init__(self, entries: tuple[str, ...] = ()) -> None:
        self._rules = tuple(_parse_entry(entry) for entry in entries)

    def permits(self, host: str, port: int, ip: IPAddress) -> bool:
        return any(rule.matches(host, port, ip) for rule in self._rules)


def _parse_entry(entry: str) -> _Rule:
    text = entry.strip().lower()
    if not text:
        raise ValueError("empty allowed_hosts entry")
    if "/" in text:
        return _Rule(network=_single_or_network(text))
    port: int | None = None
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"allowed_hosts entry {entry!r} is malformed")
            port = _port(rest[1:], entry)
        return _Rule(network=_single_or_network(address), port=port)
    if text.count(":") > 1:
        return _Rule(network=_single_or_network(text))
    if ":" in text:
        text, _, port_text = text.partition(":")
        port = _port(port_text, entry)
    try:
        return _Rule(network=_single_or_network(text), port=port)
    except ValueError:
        pass
    name = text.rstrip(".")
    if not _HOSTNAME.match(name):
        raise ValueError(f"allowed_hosts entry {entry!r} is neither a host name, an address nor a CIDR")
    return _Rule(name=name, port=port)


def _single_or_network(text: str) -> IPNetwork:
    network = ipaddress.ip_network(text, strict=False)
    if network.num_addresses == 1:
        # Compare in the canonical spelling resolved addresses get ("::ffff:a.b.c.d" → IPv4).
        only = canonical(network.network_address)
        return ipaddress.ip_network(only)
    return network


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"allowed_hosts entry {entry!r} has an invalid port")
    return int(text)


def resolve(host: str, port: int, *, timeout: float) -> list[IPAddress]:
    """Resolve ``host`` once, within ``timeout`` seconds; canonical, de-duplicated, in order."""
    infos = _getaddrinfo(host, port, timeout=timeout)
    addresses: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = canonical(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise ImageRejected(f"image host {host!r} has no IPv4 or IPv6 address", code="unknown_host")
    return addresses


def _getaddrinfo(host: str, port: int, *, timeout: float) -> list[tuple[Any, ...]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass  # a name (or an address spelt oddly, which getaddrinfo reads): looked up below
    else:
        # An address in its usual spelling needs no lookup: answered here, in getaddrinfo's shape.
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(ip), port))]
    result = _RESOLVER.lookup(host, port, timeout=timeout)
    if isinstance(result, socket.gaierror):
        if result.errno in _PERMANENT_GAI_ERRORS:
            raise ImageRejected(f"image host {host!r} does not exist (DNS: {result.strerror})", code="unknown_host") from result
        raise UpstreamUnavailable(f"DNS lookup of image host {host!r} failed: {result.strerror}", code="connection_failed") from result
    if isinstance(result, UnicodeError):
        raise ImageRejected(f"image host {host!r} is not a valid host name", code="bad_url") from result
    if isinstance(result, Exception):
        raise UpstreamUnavailable(f"DNS lookup of image host {host!r} failed: {result}", code="connection_failed") from result
    return result  # type: ignore[return-value]  # the only other thing _serve appends


class _Resolver:
    """DNS lookups on long-lived daemon threads, each within the caller's timeout.

    getaddrinfo has no timeout of its own and the resolver's can exceed the fetch deadline, so
    it runs on another thread that the caller abandons (it finishes on its own) if slow. The
    threads are kept between lookups (a thread started per lookup costs about 0.2 ms of CPU,
    issue 14); a lookup that finds none idle starts one, so a hung lookup never holds up others.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0
        self._lookups: queue.SimpleQueue[tuple[str, int, list[object], threading.Event]] = queue.SimpleQueue()

    def lookup(self, host: str, port: int, *, timeout: float) -> object:
        """getaddrinfo's answer, or the exception it raised; FetchTimeout past ``timeout``."""
        outcome: list[object] = []
        done = threading.Event()
        with self._lock:
            if self._idle:
                self._idle -= 1  # claimed: every queued lookup has a thread of its own to run it
            else:
                threading.Thread(target=self._serve, name="vqa-resolve", daemon=True).start()
        self._lookups.put((host, port, outcome, done))
        if not done.wait(max(timeout, 0.0)):
            raise FetchTimeout(f"looking up image host {host!r} took longer than the fetch deadline", code="timeout")
        return outcome[0]

    def _serve(self) -> None:
        while True:
            host, port, outcome, done = self._lookups.get()
            try:
                outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
            except Exception as exc:  # handed to the waiting thread, which translates it
                outcome.append(exc)
            done.set()
            with self._lock:
                self._idle += 1


_RESOLVER = _Resolver()

_PERMANENT_GAI_ERRORS = frozenset(
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None), getattr(socket, "EAI_FAIL", None))
    if code is not None
)


def vet(target: Target, rules: HostRules, *, timeout: float) -> list[IPAddress]:
    """Resolve ``target.host`` once and return its addresses if every one may be contacted.

    Raises ImageRejected ``blocked_address`` if any address is internal and not excepted by
    ``rules``: a name that resolves to one public and one private address is refused, since
    the connection could land on either.
    """
    addresses = resolve(target.host, target.port, timeout=timeout)
    for ip in addresses:
        reason = blocked_reason(ip)
        if reason is not None and not rules.permits(target.host, target.port, ip):
            shown = target.host if target.host == str(ip) else f"{target.host!r} resolves to {ip}, which"
            raise ImageRejected(
                f"image host {shown} is a {reason} address; only public hosts can be fetched "
                "(an operator can add exceptions to VQA_ALLOWED_HOSTS)",
                code="blocked_address",
            )
    return addresses
