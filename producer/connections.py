"""The one place Redis clients are made, for the producer side and the worker alike.

Every client gets the same short timeouts, so an unreachable Redis surfaces as an error in
seconds instead of a hang. Callers that must not have a command retried behind their back
(a pop retried after a lost reply would take more messages) pass ``retries=False``.

A Sentinel URL (producer/redis_urls.py) gives a client whose connections ask the sentinels for
the current master: after a failover the next command that reconnects lands on the promoted replica.
"""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from producer.redis_urls import is_sentinel_url, parse_sentinel_url

CONNECT_TIMEOUT_S = 5
SOCKET_TIMEOUT_S = 30


def redis_client(url: str, *, retries: bool = True, master_name: str | None = None) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``, ``sentinel://``).

    ``master_name`` is the Sentinel master for the kombu ``sentinel://`` form (``VQA_SENTINEL_MASTER_NAME``).
    """
    options: dict[str, object] = {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S}
    if not retries:
        options["retry"] = Retry(NoBackoff(), 0)
    if is_sentinel_url(url):
        target = parse_sentinel_url(url, master_name=master_name)
        sentinels = Sentinel(
            list(target.sentinels),
            sentinel_kwargs={"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": CONNECT_TIMEOUT_S},
        )
        return sentinels.master_for(  # type: ignore[no-any-return]
            target.master_name, db=target.db, username=target.username, password=target.password, **options
        )
    return redis.Redis.from_url(url, **options)  # type: ignore[arg-type]
