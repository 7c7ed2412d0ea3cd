"""Which jobs must not run: cancelled ones (a revoke marker in Redis) and those past their deadline.

One mechanism for every way to cancel: ``vqa cancel``, ``VQAClient.cancel`` and whatever else
cancels (a Celery revoke, a bulk run) set ``vqa:revoked:<job_id>`` with a TTL
(producer/keys.py), so a cancel reaches every worker, including workers started later, and
holds while no worker runs. A worker checks twice before a job can reach the model: on the
fetch pool before fetching (worker/preparing.py), and on the consumer thread when the job's
batch is handed to the model thread (worker/consumer.py). A job already in the model
finishes. A cancelled or expired job ends in a failed record with code ``cancelled`` or
``expired`` (the result backend's state is REVOKED).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

import redis

from producer import keys
from producer.errors import JobCancelled, JobExpired, VQAError
from producer.schema import Job, utcnow

log = logging.getLogger(__name__)


class CancelCheck:
    """``reasons(jobs)``: the jobs that must not run, each with the error its record will carry."""

    def __init__(self, client: redis.Redis, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.client = client
        self._clock = clock

    def reasons(self, jobs: Sequence[Job]) -> dict[str, VQAError]:
        """One Redis round trip for the lot; when Redis is away, only deadlines are checked (the jobs run)."""
        now = self._clock()
        found: dict[str, VQAError] = {}
        for job in jobs:
            if job.deadline is not None and job.deadline <= now:
                found[job.job_id] = JobExpired(f"its deadline {job.deadline.isoformat()} passed before it reached the model")
        rest = [job for job in jobs if job.job_id not in found]
        if not rest:
            return found
        try:
            markers = self.client.mget([keys.revoked_key(job.job_id) for job in rest])
        except redis.RedisError as exc:
            log.warning("cannot read cancels (%s); %d jobs run unchecked", type(exc).__name__, len(rest))
            return found
        for job, marker in zip(rest, markers, strict=True):
            if marker is not None:
                found[job.job_id] = JobCancelled(f"cancelled{_describe(marker)} before it reached the model")
        return found


def _describe(marker: bytes) -> str:
    try:
        info = json.loads(marker)
        return f" at {info['at']} ({str(info['by'])[:80]})"
    except (ValueError, KeyError, TypeError):
        return ""
