"""``VQA_ACCEPT_REPLICAS``: a submission counts as accepted once its messages are on N replicas.

Redis replicates asynchronously, so a master that dies right after a publish can take the
just-published messages with it when sentinels promote a replica. ``WAIT N timeout`` blocks until
N replicas acknowledged every write *of that connection*; the publish itself may have gone over
another pooled connection (or Celery's), so we make one small write on a pinned connection and
WAIT behind it: replication is one ordered stream, so a replica that has the probe has the publish too.
"""

from __future__ import annotations

import redis

from producer.errors import BackendUnavailable

PROBE_KEY = "vqa:replication-probe"


def wait_for_replicas(client: redis.Redis, replicas: int, timeout_ms: int) -> int:
    """Block until ``replicas`` replicas have everything written so far; raise BackendUnavailable if they do not in time."""
    if replicas <= 0:
        return 0
    try:
        pipe = client.pipeline(transaction=False)  # one connection for the probe and its WAIT
        pipe.incr(PROBE_KEY)
        pipe.execute_command("WAIT", replicas, timeout_ms)
        _, acknowledged = pipe.execute()
    except redis.RedisError as exc:
        raise BackendUnavailable(f"cannot confirm replication: {type(exc).__name__}: {exc}") from exc
    if int(acknowledged) < replicas:
        raise BackendUnavailable(f"published, but only {acknowledged} of {replicas} replicas acknowledged within {timeout_ms} ms")
    return int(acknowledged)
