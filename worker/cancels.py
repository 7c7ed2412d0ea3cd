"""Which jobs must not run: cancelled ones (a revoke marker in Redis) and those past their deadline.

One mechanism for every way to cancel: ``vqa cancel``, ``VQAClient.cancel``, a Celery
``revoke`` (worker/control.py) and whatever else cancels set ``vqa:revoked:<job_id>`` with a
TTL (producer/revokes.py), so a cancel reaches every worker, including workers started later,
and holds while no worker runs. A worker checks before a job can reach the model:

    fetch stage       before fetching (worker/preparing.py)                       Redis
    hand-off          when the job's batch is handed to the model thread
                      (worker/consumer.py)                                        Redis
    model thread      right before generate, and for jobs waiting for a retry
                      (worker/consumer.py)                                        memory

The in-memory set (:class:`RevokedSet`) holds the revokes this worker received over remote
control and the markers of the jobs it holds, read about twice a second (worker/control.py),
so the last check costs no I/O. Redis stays the authority: a job whose marker is gone (it was
submitted again after its cancel) is dropped from the set when a Redis check finds no marker.
A job already in the model finishes. A cancelled or expired job ends in a failed record with
code ``cancelled`` or ``expired`` (the result backend's state is REVOKED).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

import redis

from producer.errors import JobCancelled, JobExpired, VQAError
from producer.revokes import read_revokes
from producer.schema import Job, utcnow

log = logging.getLogger(__name__)

# Celery's worker keeps at most this many revoked ids in memory too (celery.worker.state).
REVOKES_KEPT = 50_000


class RevokedSet:
    """Job ids revoked in this worker's memory, each kept for ``ttl_s``; safe to use from any thread."""

    def __init__(self, *, ttl_s: float, maxlen: int = REVOKES_KEPT, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._maxlen = maxlen
        self._clock = clock
        self._added: dict[str, float] = {}  # job id -> when it was added (insertion order: oldest first)
        self._lock = threading.Lock()

    def add(self, job_ids: Iterable[str]) -> None:
        now = self._clock()
        with self._lock:
            for job_id in job_ids:
                self._added.pop(job_id, None)
                self._added[job_id] = now
            while len(self._added) > self._maxlen:
                del self._added[next(iter(self._added))]

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            added = self._added.get(job_id)  # type: ignore[call-overload]
            if added is None:
                return False
            if self._clock() - added > self._ttl_s:
                del self._added[job_id]  # type: ignore[arg-type]
                return False
            return True

    def __len__(self) -> int:
        return len(self._added)

    def ids(self) -> list[str]:
        """Oldest first, as Celery's ``inspect revoked`` lists them."""
        now = self._clock()
        with self._lock:
            return [job_id for job_id, added in self._added.items() if now - added <= self._ttl_s]

    def forget(self, job_ids: Iterable[str], *, added_before: float) -> None:
        """Drop these ids if they were added before ``added_before`` (a Redis read that began then found no marker)."""
        with self._lock:
            for job_id in job_ids:
                added = self._added.get(job_id)
                if added is not None and added < added_before:
                    del self._added[job_id]

    def now(self) -> float:
        return self._clock()


class CancelCheck:
    """``reasons(jobs)``: the jobs that must not run, each with the error its record will carry."""

    def __init__(self, client: redis.Redis, *, clock: Callable[[], datetime] = utcnow, revoked: RevokedSet | None = None) -> None:
        self.client = client
        self._clock = clock
        self.revoked = revoked if revoked is not None else RevokedSet(ttl_s=7 * 24 * 3600)

    def reasons(self, jobs: Sequence[Job], *, markers: dict[str, bytes] | None = None, read_at: float | None = None) -> dict[str, VQAError]:
        """One Redis round trip for the lot; when Redis is away, deadlines and the in-memory revokes are checked.

        ``markers``: the jobs' revoke markers as the caller read them (:func:`producer.revokes.read_revokes`'s
        answer) at ``read_at`` (:meth:`RevokedSet.now`), in a round trip it needed anyway: then none is made here.
        """
        found = self._expired(jobs)
        rest = [job.job_id for job in jobs if job.job_id not in found]
        if not rest:
            return found
        if markers is None or read_at is None:
            read_at = self.revoked.now()
            try:
                markers = read_revokes(self.client, rest)
            except redis.RedisError as exc:
                log.warning("cannot read cancels (%s); %d jobs checked against this worker's revokes only", type(exc).__name__, len(rest))
                found.update(self._revoked_here(rest))
                return found
        markers = {job_id: marker for job_id, marker in markers.items() if job_id in rest}
        self.revoked.forget([job_id for job_id in rest if job_id not in markers], added_before=read_at)
        for job_id, marker in markers.items():
            found[job_id] = JobCancelled(f"cancelled{_describe(marker)} before it reached the model")
        return found

    def local_reasons(self, jobs: Sequence[Job]) -> dict[str, VQAError]:
        """The same without I/O (the model thread's last look): deadlines and the in-memory revokes."""
        found = self._expired(jobs)
        found.update(self._revoked_here([job.job_id for job in jobs if job.job_id not in found]))
        return found

    def _expired(self, jobs: Sequence[Job]) -> dict[str, VQAError]:
        now = self._clock()
        return {
            job.job_id: JobExpired(f"its deadline {job.deadline.isoformat()} passed before it reached the model")
            for job in jobs
            if job.deadline is not None and job.deadline <= now
        }

    def _revoked_here(self, job_ids: Sequence[str]) -> dict[str, VQAError]:
        return {job_id: JobCancelled("cancelled before it reached the model") for job_id in job_ids if job_id in self.revoked}


def _describe(marker: bytes) -> str:
    try:
        info = json.loads(marker)
        return f" at {info['at']} ({str(info['by'])[:80]})"
    except (ValueError, KeyError, TypeError):
        return ""
