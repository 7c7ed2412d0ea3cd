"""Per-job counters in Redis, shared by every worker: model runs, and deliveries that never came back from the model.

    vqa:executions:<job>   one per model run, counted before the run starts: a run that kills
                           its worker counts too. > 1 means the job ran again (redelivery, retry).
    vqa:deliveries:<job>   one per delivery that reached the model; deleted once the model
                           returns from the job. What is left counts crashes: past
                           VQA_MAX_DELIVERIES the job is poison.

A Redis error never stops a job: counting is skipped (and the job treated as a first delivery).

The model thread makes one Redis round trip per group it runs (:meth:`JobCounters.count_run`),
and it must wait for it: a run that kills the worker (a CUDA fault, the OOM killer) must already
be counted, or a poison job would never be quarantined. Reading the counts (on the fetch pool)
and resetting them after the run (on the writer thread) happen elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from producer import keys

log = logging.getLogger(__name__)

COUNTER_TTL_S = 7 * 24 * 3600

# KEYS: per job its deliveries key then its executions key, then the deliveries keys of jobs
# the model came back from since the last count (survivors). ARGV[1]: max deliveries, ARGV[2]:
# TTL, ARGV[3]: the number of jobs n, ARGV[3 + i]: "1" when job i's delivery is to be counted
# (its first time in a model on this delivery). Survivors' counts are deleted first, in the same
# round trip: the model came back from them, so a crash in this run is not theirs. A job whose
# count passes the limit is poison: it does not run, so its run is not counted. Returns per job
# {deliveries (-1 when not counted), executions (0 when poison)}.
_COUNT_RUN = """
local n = tonumber(ARGV[3])
for i = 2 * n + 1, #KEYS do redis.call('DEL', KEYS[i]) end
local out = {}
for i = 1, n do
  local deliveries, executions = -1, 0
  if ARGV[3 + i] == '1' then
    deliveries = redis.call('INCR', KEYS[2 * i - 1])
    redis.call('EXPIRE', KEYS[2 * i - 1], ARGV[2])
  end
  if deliveries <= tonumber(ARGV[1]) then
    executions = redis.call('INCR', KEYS[2 * i])
    redis.call('EXPIRE', KEYS[2 * i], ARGV[2])
  end
  out[#out + 1] = {deliveries, executions}
end
return out
"""


@dataclass(frozen=True)
class RunCount:
    """One job's counts as it enters the model."""

    deliveries: int | None  # None when this delivery was counted before (a retry on the same delivery)
    executions: int  # 0: not run, the job is poison


@dataclass(frozen=True)
class JobHistory:
    """One job's counts as the fetch pool reads them, before this delivery reaches the model."""

    earlier_deliveries: int  # deliveries that reached a model and never came back
    executions: int  # model runs so far; 0: no record can exist yet unless Redis lost the count


class JobCounters:
    """Reads and bumps the counters for a batch's jobs, one round trip per call."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._count_run = client.register_script(_COUNT_RUN)

    def count_run(
        self, job_ids: Sequence[str], *, count_delivery: Sequence[bool], max_deliveries: int, survivors: Sequence[str] = ()
    ) -> list[RunCount]:
        """Count each job's delivery (where asked) and its model run, in one round trip; poison jobs are not run.

        ``survivors``: jobs the model came back from since the last call, whose delivery counts
        start over before this run (see :meth:`survived`, which the writer thread calls later).
        """
        if not job_ids:
            return []
        script_keys = [key for job_id in job_ids for key in (keys.deliveries_key(job_id), keys.executions_key(job_id))]
        script_keys += [keys.deliveries_key(job_id) for job_id in survivors]
        flags = ["1" if flag else "0" for flag in count_delivery]
        try:
            replies = self._count_run(keys=script_keys, args=[max_deliveries, COUNTER_TTL_S, len(job_ids), *flags])
        except redis.RedisError as exc:
            log.warning("cannot count deliveries and executions (%s); skipped for this batch", type(exc).__name__)
            return [RunCount(deliveries=1 if flag else None, executions=1) for flag in count_delivery]
        counts = [RunCount(deliveries=None if d == -1 else int(d), executions=int(e)) for d, e in replies]
        for job_id, count in zip(job_ids, counts, strict=True):
            if count.executions > 1:
                log.warning("job %s runs the model for the %d. time (redelivery or retry)", job_id, count.executions, extra={"job_id": job_id})
        return counts

    def history(self, job_id: str) -> JobHistory:
        """The job's counts before this delivery, in one round trip; a first delivery's (0, 0) when Redis is away."""
        try:
            return self.history_from(self.client.mget(self.history_keys(job_id)))
        except redis.RedisError:
            return JobHistory(earlier_deliveries=0, executions=0)

    @staticmethod
    def history_keys(job_id: str) -> list[str]:
        """The keys :meth:`history` reads, for a caller that reads them in a round trip of its own (worker/preparing.py)."""
        return [keys.deliveries_key(job_id), keys.executions_key(job_id)]

    @staticmethod
    def history_from(values: list[bytes | None]) -> JobHistory:
        """The history from the values of :meth:`history_keys`, in that order."""
        deliveries, executions = values
        return JobHistory(earlier_deliveries=int(deliveries or 0), executions=int(executions or 0))

    def earlier_deliveries(self, job_id: str) -> int:
        """Deliveries of the job that reached a model and never came back; 0 when Redis is away."""
        try:
            return int(self.client.get(keys.deliveries_key(job_id)) or 0)
        except redis.RedisError:
            return 0

    def survived(self, job_ids: list[str]) -> None:
        """The model came back from these jobs: they did not kill it, so their delivery counts start over.

        Otherwise a job whose record was still being stored when a poison job in the next batch
        killed the worker would be charged with that crash too.
        """
        try:
            self.client.delete(*(keys.deliveries_key(job_id) for job_id in job_ids))
        except redis.RedisError:
            pass  # counted once more than needed; quarantine still takes max_deliveries crashes

    def forget_submission(self, job_id: str) -> None:
        """A failed job may be submitted again; drop the producer's 'already queued' claim."""
        try:
            self.client.delete(keys.submitted_key(job_id))
        except redis.RedisError:
            pass
