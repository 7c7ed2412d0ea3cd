"""Lifecycle hooks: where features plug into the worker without editing the runner (dramatiq's middleware).

A hook is a :class:`Hook` subclass overriding the points it cares about; the worker calls every
registered hook, in registration order, at these points:

    on_worker_start(worker)   consumer about to start (main thread)
    on_received(job, headers) a message became a job this worker holds (consumer thread)
    on_rejected(tag, reason)  a queue entry was refused at intake and dead-lettered (consumer thread)
    on_started(jobs)          a group of jobs is about to run in the model; their STARTED state is
                              written (status thread)
    on_retried(job, error, delay_s)
                              a transient failure gets the job another attempt (consumer thread)
    on_stored(record, job, created)
                              the job's record is in S3 and the result backend, and its message is
                              not acked yet (the writer thread); ``created`` is False when the record
                              already existed (a redelivery, or a duplicate)
                              A hook whose work can serve a batch at once (one Redis round trip,
                              not one per job) overrides ``on_stored_batch(stored)`` instead: the
                              batch's stored jobs, on the writer thread; its default calls
                              ``on_stored`` per job
    on_batch(report)          the model finished a batch; called before its jobs' on_stored
                              (writer thread)
    on_worker_stop()          the consumer has stopped (main thread)

Rules, so that a hook can never slow the model or lose a job:

* No hook runs on the model thread. A hook that talks to the network either does so on its
  own thread (Celery events) or is quick and belongs before the ack (completion events).
* ``on_stored`` runs before the message is acked, so a hook can make its own work durable
  first: if it raises :class:`producer.errors.TransientError`, the message is handed back
  and the redelivery calls ``on_stored`` again with ``created=False`` (the hook dedupes).
  That gives at-least-once side effects. Any other exception is logged and ignored.
  ``on_stored_batch`` returns, per job, the TransientError that hands its message back, or None.
* An exception from any other point is logged and ignored: hooks are observers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from producer.errors import TransientError, VQAError
from producer.schema import Job, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """Who is starting: what hooks need to name the worker and reach its settings."""

    name: str
    queue: str


@dataclass(frozen=True)
class BatchReport:
    """One finished model batch (a group of jobs that ran in one generate call, and its splits)."""

    size: int  # jobs that reached the model in this batch
    generate_s: float  # wall time of the batch's generate calls
    real_tokens: int  # prompt tokens of the jobs
    padded_tokens: int  # what padding made the model compute
    executions: int  # model runs counted for these jobs
    duplicate_executions: int  # runs of jobs that had run before
    oom_splits: int  # out-of-memory splits while running it
    batch_id: str = ""  # "<worker>-<n>": what logs and records of this batch's jobs are correlated by
    job_ids: tuple[str, ...] = ()  # the jobs that ran in it, in order
    preprocess_s: tuple[float, ...] = ()  # each job's preprocessing (tiles, prompt) on the fetch pool


@dataclass(frozen=True)
class StoredJob:
    """One job whose record is stored: what ``on_stored`` is called with."""

    record: Record
    job: Job
    created: bool


class Hook:
    """No-op base: override the points you need (see the module docstring for threads and rules)."""

    def on_worker_start(self, worker: WorkerInfo) -> None:
        pass

    def on_received(self, job: Job, headers: Mapping[str, Any]) -> None:
        pass

    def on_rejected(self, tag: str, reason: str) -> None:
        pass

    def on_started(self, jobs: Sequence[Job]) -> None:
        pass

    def on_retried(self, job: Job, error: VQAError, delay_s: float) -> None:
        pass

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        pass

    def on_stored_batch(self, stored: Sequence[StoredJob]) -> list[TransientError | None]:
        """``on_stored`` for each job; per job, the transient failure that hands its message back (or None)."""
        failures: list[TransientError | None] = []
        for item in stored:
            try:
                self.on_stored(item.record, job=item.job, created=item.created)
            except TransientError as exc:
                failures.append(exc)
                continue
            except Exception:  # noqa: BLE001 - as in Hooks._each: an observer's bug is logged, the job goes on
                log.exception("hook %s.on_stored failed", type(self).__name__)
            failures.append(None)
        return failures

    def on_batch(self, report: BatchReport) -> None:
        pass

    def on_worker_stop(self) -> None:
        pass


class Hooks(Hook):
    """The worker's registered hooks, called in order; one hook's failure never reaches another or the job."""

    def __init__(self, hooks: Sequence[Hook] = ()) -> None:
        self.hooks = list(hooks)

    def add(self, hook: Hook) -> None:
        self.hooks.append(hook)

    def _each(self, point: str, *args: Any, **kwargs: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, point)(*args, **kwargs)
            except Exception:  # noqa: BLE001 - an observer must not break the worker
                log.exception("hook %s.%s failed", type(hook).__name__, point)

    def on_worker_start(self, worker: WorkerInfo) -> None:
        self._each("on_worker_start", worker)

    def on_received(self, job: Job, headers: Mapping[str, Any]) -> None:
        self._each("on_received", job, headers)

    def on_rejected(self, tag: str, reason: str) -> None:
        self._each("on_rejected", tag, reason)

    def on_started(self, jobs: Sequence[Job]) -> None:
        self._each("on_started", jobs)

    def on_retried(self, job: Job, error: VQAError, delay_s: float) -> None:
        self._each("on_retried", job, error, delay_s)

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        """Every hook runs; the first transient failure is raised after all have run (the message is handed back)."""
        [failure] = self.on_stored_batch([StoredJob(record, job, created)])
        if failure is not None:
            raise failure

    def on_stored_batch(self, stored: Sequence[StoredJob]) -> list[TransientError | None]:
        """Every hook's on_stored for the batch; per job, the first transient failure (its message is handed back)."""
        first: list[TransientError | None] = [None] * len(stored)
        for hook in self.hooks:
            try:
                failures = hook.on_stored_batch(stored)
            except TransientError as exc:
                failures = [exc] * len(stored)
            except Exception:  # noqa: BLE001 - as in _each
                log.exception("hook %s.on_stored failed", type(hook).__name__)
                continue
            for index, (item, failure) in enumerate(zip(stored, failures, strict=True)):
                if failure is not None:
                    log.warning("hook %s.on_stored: %s; the job's message goes back", type(hook).__name__, failure,
                                extra={"job_id": item.job.job_id})
                    first[index] = first[index] or failure
        return first

    def on_batch(self, report: BatchReport) -> None:
        self._each("on_batch", report)

    def on_worker_stop(self) -> None:
        self._each("on_worker_stop")
