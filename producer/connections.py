"""The one place Redis clients are made, for the producer side and the worker alike.

Every client gets the same short timeouts, so an unreachable Redis surfaces as an error in
seconds instead of a hang. Callers that must not have a command retried behind their back
(a pop retried after a lost reply would take more messages) pass ``retries=False``.
"""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

CONNECT_TIMEOUT_S = 5
SOCKET_TIMEOUT_S = 30


def redis_client(url: str, *, retries: bool = True) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``; passwords in the URL work)."""
    options: dict[str, object] = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S}
    if not retries:
        options["retry"] = Retry(NoBackoff(), 0)
    return redis.Redis.from_url(url, **options)  # type: ignore[arg-type]
