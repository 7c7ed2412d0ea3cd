"""The one way a cancel is written: a revoke marker per job in Redis, with a TTL.

``VQAClient.cancel`` / ``vqa cancel`` write it directly (so a cancel holds while no worker
runs), and a worker writes it for every Celery ``revoke`` it receives (worker/control.py):
Celery's own worker keeps revokes in memory only, so a revoke sent while no worker listened,
or to a worker that restarts, would be lost. Every worker reads the markers before a job can
reach the model (worker/cancels.py); key names live in producer/keys.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis

from producer import keys
from producer.schema import utcnow


def write_revokes(client: redis.Redis, job_ids: Iterable[str], *, ttl_s: int, by: str) -> list[str]:
    """Set the revoke marker of each job (one round trip), saying when and by whom; the ids written.

    Raises ``redis.RedisError`` when Redis cannot be reached: nothing is cancelled then.
    """
    ids = list(dict.fromkeys(job_ids))
    if not ids:
        return []
    marker = json.dumps({"at": utcnow().isoformat(timespec="seconds"), "by": by[:200]})
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.set(keys.revoked_key(job_id), marker, ex=ttl_s)
    pipe.execute()
    return ids


def read_revokes(client: redis.Redis, job_ids: list[str]) -> dict[str, bytes]:
    """The markers of those of ``job_ids`` that are revoked (one MGET); raises ``redis.RedisError``."""
    if not job_ids:
        return {}
    markers = client.mget([keys.revoked_key(job_id) for job_id in job_ids])
    return {job_id: marker for job_id, marker in zip(job_ids, markers, strict=True) if marker is not None}
