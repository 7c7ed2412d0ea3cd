"""Where each job this worker holds is, for remote control (worker/control.py): a thread-safe table.

The consumer thread owns job state (worker/consumer.py); it writes each change here, and other
threads read only :meth:`JobBoard.snapshot`, a copy taken under the lock. States are Celery's:

    reserved    received and not in the model: being fetched, in the batcher, or in the batch
                queued behind the running one (Celery: prefetched, not yet executing)
    scheduled   waiting for a retry after a transient failure, until ``eta``
    active      handed to the model thread (set by it, right before the batch runs), until the
                job's record is stored and its message acked

Entries keep references to immutable values only (the Job, the message's properties), so a
snapshot can be turned into replies on another thread without touching consumer state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from producer.schema import Job

State = Literal["reserved", "scheduled", "active"]


@dataclass(frozen=True)
class HeldJob:
    """One held job as remote control sees it."""

    job: Job
    properties: Mapping[str, Any]  # the message's kombu properties (priority, delivery_info)
    state: State = "reserved"
    time_start: float | None = None  # wall clock (time.time()) when it was handed to the model
    eta: float | None = None  # wall clock when its retry is due (scheduled)


class JobBoard:
    """Held jobs by id; every method is safe from any thread and never blocks on I/O."""

    def __init__(self) -> None:
        self._jobs: dict[str, HeldJob] = {}
        self._lock = threading.Lock()
        self.processed = 0  # jobs settled with their record stored (acked)

    def reserve(self, job: Job, properties: Mapping[str, Any]) -> None:
        with self._lock:
            self._jobs[job.job_id] = HeldJob(job=job, properties=dict(properties))

    def schedule(self, job_id: str, *, delay_s: float) -> None:
        self._set(job_id, state="scheduled", eta=time.time() + delay_s, time_start=None)

    def unschedule(self, job_id: str) -> None:
        self._set(job_id, state="reserved", eta=None)

    def activate(self, job_ids: Iterable[str]) -> None:
        now = time.time()
        with self._lock:
            for job_id in job_ids:
                held = self._jobs.get(job_id)
                if held is not None:
                    self._jobs[job_id] = replace(held, state="active", time_start=now, eta=None)

    def release(self, job_id: str, *, acked: bool) -> None:
        with self._lock:
            if self._jobs.pop(job_id, None) is not None and acked:
                self.processed += 1

    def snapshot(self) -> list[HeldJob]:
        with self._lock:
            return list(self._jobs.values())

    def held_ids(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def _set(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            held = self._jobs.get(job_id)
            if held is not None:
                self._jobs[job_id] = replace(held, **changes)
