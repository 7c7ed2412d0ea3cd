"""Per-job counters in Redis, shared by every worker: model runs, and deliveries that never came back from the model.

    vqa:executions:<job>   one per model run, counted before the run starts: a run that kills
                           its worker counts too. > 1 means the job ran again (redelivery, retry).
    vqa:deliveries:<job>   one per delivery that reached the model; deleted once the model
                           returns from the job. What is left counts crashes: past
                           VQA_MAX_DELIVERIES the job is poison.

A Redis error never stops a job: counting is skipped (and the job treated as a first delivery).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import redis

from producer import keys

log = logging.getLogger(__name__)

COUNTER_TTL_S = 7 * 24 * 3600


class JobCounters:
    """Reads and bumps the counters for a batch's jobs, one round trip per call."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def earlier_deliveries(self, job_ids: list[str]) -> dict[str, int]:
        """Deliveries of each job that reached a model and never came back; {} when Redis is away."""
        if not job_ids:
            return {}
        try:
            raw = self.client.mget([keys.deliveries_key(job_id) for job_id in job_ids])
        except redis.RedisError:
            return {}
        return {job_id: int(value or 0) for job_id, value in zip(job_ids, raw, strict=True)}

    def count_deliveries(self, job_ids: list[str]) -> list[int]:
        """Count this delivery of each job as reaching the model; the new totals (1 each when Redis is away)."""
        return self._bump(keys.deliveries_key, job_ids, what="deliveries")

    def survived(self, job_ids: list[str]) -> None:
        """The model came back from these jobs: they did not kill it, so their delivery counts start over.

        Otherwise a job whose record was still being stored when a poison job in the next batch
        killed the worker would be charged with that crash too.
        """
        try:
            self.client.delete(*(keys.deliveries_key(job_id) for job_id in job_ids))
        except redis.RedisError:
            pass  # counted once more than needed; quarantine still takes max_deliveries crashes

    def count_executions(self, job_ids: list[str]) -> list[int]:
        """Count one model run per job; the new totals (1 each when Redis is away)."""
        counts = self._bump(keys.executions_key, job_ids, what="executions")
        for job_id, count in zip(job_ids, counts, strict=True):
            if count > 1:
                log.warning("job %s runs the model for the %d. time (redelivery or retry)", job_id, count)
        return counts

    def forget_submission(self, job_id: str) -> None:
        """A failed job may be submitted again; drop the producer's 'already queued' claim."""
        try:
            self.client.delete(keys.submitted_key(job_id))
        except redis.RedisError:
            pass

    def _bump(self, key: Callable[[str], str], job_ids: list[str], *, what: str) -> list[int]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.incr(key(job_id))
                pipe.expire(key(job_id), COUNTER_TTL_S)
            return [int(count) for count in pipe.execute()[::2]]
        except redis.RedisError as exc:
            log.warning("cannot count %s (%s); skipped for this batch", what, type(exc).__name__)
            return [1] * len(job_ids)
