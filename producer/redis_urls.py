"""Redis URLs with Sentinel: which sentinels to ask, for which master, and the form Celery/kombu want.

Two spellings name a Sentinel-managed master (see docs/reliability.md, "Redis failover"):

* ``redis+sentinel://[[user]:password@]host:port[,host:port...]/MASTER[/DB]`` - everything in one URL;
* kombu's ``sentinel://[:password@]host:port[/DB][;sentinel://host:port...]`` - the master's name
  comes from ``VQA_SENTINEL_MASTER_NAME`` (kombu's ``master_name`` transport option).

The password is the master's (and its replicas'); the sentinels themselves are asked without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SENTINEL_SCHEMES = ("redis+sentinel://", "sentinel://")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A master known by name to a set of sentinels."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    def kombu_url(self) -> str:
        """The ``sentinel://...;sentinel://...`` form that kombu's transport and Celery's backend read."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        return ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEMES)


def parse_sentinel_url(url: str, *, master_name: str | None = None) -> SentinelTarget:
    """Parse either spelling; ``master_name`` is needed for (and only used by) the kombu form."""
    if url.startswith("redis+sentinel://"):
        return _parse_redis_sentinel(url)
    if url.startswith("sentinel://"):
        return _parse_kombu(url, master_name)
    raise ValueError(f"not a sentinel URL: {url.split('://', 1)[0]}://...")


def _parse_redis_sentinel(url: str) -> SentinelTarget:
    rest = url[len("redis+sentinel://") :]
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise ValueError("a redis+sentinel:// URL names its master: redis+sentinel://host:port,.../MASTER[/DB]")
    username, password = _split_auth(auth)
    return SentinelTarget(
        sentinels=tuple(_host_port(host) for host in hosts.split(",") if host),
        master_name=unquote(parts[0]),
        db=_db(parts[1] if len(parts) > 1 else "0"),
        username=username,
        password=password,
    )


def _parse_kombu(url: str, master_name: str | None) -> SentinelTarget:
    if not master_name:
        raise ValueError("a sentinel:// URL needs the master's name: set VQA_SENTINEL_MASTER_NAME")
    sentinels: list[tuple[str, int]] = []
    username = password = None
    db = 0
    for index, one in enumerate(part for part in url.split(";") if part.strip()):
        split = urlsplit(one.strip())
        if split.scheme != "sentinel":
            raise ValueError("every part of a sentinel:// URL list starts with sentinel://")
        sentinels.append((split.hostname or "localhost", split.port or DEFAULT_SENTINEL_PORT))
        if index == 0:  # kombu takes the credentials and the database of the first one
            username = unquote(split.username) if split.username else None
            password = unquote(split.password) if split.password is not None else None
            db = _db(split.path.strip("/") or "0")
    return SentinelTarget(sentinels=tuple(sentinels), master_name=master_name, db=db, username=username, password=password)


def _split_auth(auth: str) -> tuple[str | None, str | None]:
    if not auth:
        return None, None
    user, colon, password = auth.partition(":")
    if not colon:
        return None, unquote(user)  # "secret@host" is a password, as in redis:// URLs
    return (unquote(user) or None), unquote(password)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        return text, DEFAULT_SENTINEL_PORT
    return host, int(port) if port else DEFAULT_SENTINEL_PORT


def _db(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"the database of a sentinel URL is a number, not {text!r}") from None
