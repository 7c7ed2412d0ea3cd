"""The inference stage: one micro-batch in, one outcome per job out.

Runs on the worker's model thread. Every job gets its own outcome: a record written
(then the message is acked), a retry later (the message stays unacked), or a hand-back
to the queue. One bad job never fails its batch companions: a batch that raises is split
in halves until the culprit stands alone.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import redis

from producer.errors import (
    BackendUnavailable,
    OutOfMemory,
    PermanentError,
    PoisonJob,
    TransientError,
    VQAError,
)
from producer.schema import ErrorInfo, Job, Record, utcnow
from producer.settings import Settings
from worker.counters import JobCounters
from worker.events import TaskEvents
from worker.storage import RecordStore

log = logging.getLogger(__name__)

_STORE_BACKOFF_CAP_S = 10.0  # an S3 or backend outage is noticed to be over within this


@dataclass
class Prepared:
    """What the fetch stage produced for a job: an image, an existing record, or an error."""

    image: Any = None
    existing: Record | None = None
    error: VQAError | None = None
    fetch_ms: float | None = None
    # The image preprocessed off the model thread (worker.model.ModelInputs), when available.
    inputs: Any = None
    cost: int = 0  # prompt tokens, image tokens included: what padding-aware batching groups by


@dataclass
class Pending:
    """A received job. ``message`` is the queue message (worker.broker.QueueMessage): only the consumer thread touches it."""

    job: Job
    message: Any
    received_at: float
    attempt: int = 1
    prepared: Prepared | None = None  # set by the fetch pool before the job reaches the batcher
    not_before: float = 0.0
    started_at: datetime | None = None
    deliveries: int = 0


@dataclass
class Outcome:
    """What the consumer thread must do with the job's message."""

    pending: Pending
    action: Literal["ack", "retry", "requeue"]
    delay_s: float = 0.0
    record: Record | None = None


@dataclass
class Finishing:
    """A batch whose model work is done and whose records are still to be stored (:meth:`BatchRunner.complete`)."""

    outcomes: list[Outcome]
    # Outcomes that are placeholders until their record is stored: complete() sets their action.
    to_store: list[tuple[Outcome, Record]] = field(default_factory=list)
    # The batch's STARTED writes (BatchRunner._mark_started); its records are stored after them.
    status_writes: list[Future[None]] = field(default_factory=list)


@dataclass
class BatchStats:
    """Counters the metrics endpoint and the benchmarks read."""

    batches: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    executions: int = 0
    duplicate_executions: int = 0
    oom_splits: int = 0
    retries: int = 0  # transient failures given another attempt
    poisoned: int = 0  # jobs quarantined after too many deliveries
    slowest_batch_s: float = 0.0  # longest generate call: the visibility timeout must cover it
    generate_started_at: float | None = None  # time.monotonic() of the generate call in progress (worker/health.py)
    batch_sizes: list[int] = field(default_factory=list)


class BatchRunner:
    """Turns a batch of prepared jobs into records, written to S3 and the result backend."""

    def __init__(
        self,
        *,
        settings: Settings,
        model: Any,
        store: RecordStore,
        counters: redis.Redis,
        worker_name: str,
        stopping: threading.Event,
        sleep: Callable[[float], None] = time.sleep,
        events: TaskEvents | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.counters = JobCounters(counters)
        self.worker_name = worker_name
        self.stopping = stopping
        self.events = events or TaskEvents.off()
        self.stats = BatchStats()
        self._sleep = sleep
        # The batch infer() is working on: records complete() must store, and its STARTED writes.
        self._deferred: list[tuple[Outcome, Record]] = []
        self._status_writes: list[Future[None]] = []
        # STARTED states go to the result backend off the model thread (with `appendfsync always`
        # each write waits for a disk flush: ~5% of the model's time when it waited for them).
        # One thread keeps them in order; complete() stores a batch's records only after them,
        # so a job's state can never go back from SUCCESS to STARTED.
        self._status_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqa-status")
        # complete() stores a batch's records concurrently: S3 and Redis round trips overlap.
        self._store_pool = ThreadPoolExecutor(max_workers=min(8, settings.max_batch_size), thread_name_prefix="vqa-store")
        self._stats_lock = threading.Lock()

    def run(self, batch: list[Pending]) -> list[Outcome]:
        return self.complete(self.infer(batch))

    def infer(self, batch: list[Pending]) -> Finishing:
        """Everything up to the answers (the model thread's part); :meth:`complete` stores the records.

        The worker runs complete() on another thread, so the model starts its next batch while
        this one's records go to S3 and the result backend.
        """
        self._deferred, self._status_writes = [], []
        try:
            outcomes = self._infer(batch)
            return Finishing(outcomes, self._deferred, self._status_writes)
        finally:
            self._deferred, self._status_writes = [], []

    def complete(self, finishing: Finishing) -> list[Outcome]:
        """Store the records of an inferred batch; every outcome is final afterwards."""
        wait(finishing.status_writes)
        placeholders = [placeholder for placeholder, _ in finishing.to_store]
        results = self._store_pool.map(lambda item: self._store(item[0].pending, item[1]), finishing.to_store)
        for placeholder, stored in zip(placeholders, results, strict=True):
            placeholder.action, placeholder.record = stored.action, stored.record
        return finishing.outcomes

    def _infer(self, batch: list[Pending]) -> list[Outcome]:
        started_at = utcnow()
        outcomes: list[Outcome] = []
        runnable: list[tuple[Pending, Prepared]] = []
        for pending in batch:
            pending.started_at = pending.started_at or started_at
            prepared = pending.prepared or Prepared()
            if prepared.existing is not None:
                outcomes.append(self._finish(pending, prepared.existing))
            elif prepared.error is not None:
                outcomes.append(self._on_error(pending, prepared.error, prepared, batch_size=len(batch)))
            else:
                runnable.append((pending, prepared))
        for group in self._isolate_suspects(runnable):
            # Counted per group, right before it runs: a crash is charged to that group only.
            group = self._drop_poison(group, outcomes, batch_size=len(batch))
            if group:
                outcomes.extend(self._run_group(group))
        return outcomes

    def _isolate_suspects(self, items: list[tuple[Pending, Prepared]]) -> list[list[tuple[Pending, Prepared]]]:
        """First deliveries run together; a job that reached a model before may be what killed that worker, so it runs alone.

        Otherwise its batch companions would be charged with its crashes and quarantined with it.
        """
        before = self.counters.earlier_deliveries([pending.job.job_id for pending, _ in items if pending.deliveries == 0])

        def earlier(pending: Pending) -> int:
            return pending.deliveries - 1 if pending.deliveries else before.get(pending.job.job_id, 0)

        fresh = [item for item in items if earlier(item[0]) == 0]
        return ([fresh] if fresh else []) + [[item] for item in items if earlier(item[0]) > 0]

    def _run_group(self, group: list[tuple[Pending, Prepared]]) -> list[Outcome]:
        """One batched generate. Executions are counted before it runs, so a run that kills the worker counts too."""
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(group))
        self._mark_started([pending.job.job_id for pending, _ in group])
        executions = self._count_executions([pending.job.job_id for pending, _ in group])
        self.stats.generate_started_at = started = time.monotonic()
        try:
            results = self._generate(group)
        finally:
            self.stats.generate_started_at = None
        self.stats.slowest_batch_s = max(self.stats.slowest_batch_s, time.monotonic() - started)
        self.counters.survived([pending.job.job_id for pending, _ in group])
        outcomes = []
        for (pending, prepared), (answer, infer_ms, size), count in zip(group, results, executions, strict=True):
            if isinstance(answer, VQAError):
                outcomes.append(self._on_error(pending, answer, prepared, batch_size=size))
                continue
            record = self._record(
                pending,
                status="succeeded",
                answer=answer,
                prepared=prepared,
                batch_size=size,  # after an out-of-memory split, the half that answered it
                infer_ms=infer_ms,
                executions=count,
            )
            outcomes.append(self._finish(pending, record))
        return outcomes

    # -- the model --------------------------------------------------------------------------

    def _generate(self, items: list[tuple[Pending, Prepared]]) -> list[tuple[str | VQAError, float | None, int]]:
        """One batched generate; on failure split in halves so only the culprit fails.

        Per job: the answer (or its error), the generate time, and the size of the call that answered it.
        """
        generation = items[0][0].job.generation
        start = time.perf_counter()
        try:
            self._inject_faults(items)
            if all(prepared.inputs is not None for _, prepared in items):
                answers = self.model.generate_prepared([prepared.inputs for _, prepared in items], generation)
            else:
                answers = self.model.generate(
                    [prepared.image for _, prepared in items], [pending.job.question for pending, _ in items], generation
                )
        except Exception as exc:  # noqa: BLE001 - isolate whatever broke; the error is kept per job
            error = exc if isinstance(exc, VQAError) else PermanentError(f"model failed: {type(exc).__name__}: {exc}", code="model_error")
            if len(items) == 1:
                log.warning("job %s failed in the model: %s", items[0][0].job.job_id, error)
                return [(error, None, 1)]
            if isinstance(error, OutOfMemory):
                self.stats.oom_splits += 1
            log.warning("batch of %d failed (%s); splitting to isolate it", len(items), error.code)
            middle = len(items) // 2
            return self._generate(items[:middle]) + self._generate(items[middle:])
        infer_ms = (time.perf_counter() - start) * 1000
        return [(answer, infer_ms, len(items)) for answer in answers]

    def _inject_faults(self, items: list[tuple[Pending, Prepared]]) -> None:
        """Test-only fault hooks (off by default): a batch with a marked question kills the worker; a batch larger than N runs out of memory."""
        marker = self.settings.fault_crash_on_question
        if marker and any(marker in pending.job.question for pending, _ in items):
            log.critical("injected crash: batch of %d holds a job marked %r (VQA_FAULT_CRASH_ON_QUESTION)", len(items), marker)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(137)  # what the kernel's OOM killer or a segfaulting kernel leaves behind
        limit = self.settings.fault_oom_above_batch
        if limit and len(items) > limit:
            raise OutOfMemory(f"injected out-of-memory for a batch of {len(items)} (VQA_FAULT_OOM_ABOVE_BATCH={limit})")

    # -- outcomes ---------------------------------------------------------------------------

    def _on_error(self, pending: Pending, error: VQAError, prepared: Prepared, *, batch_size: int) -> Outcome:
        if isinstance(error, TransientError) and pending.attempt < self.settings.max_attempts:
            self.stats.retries += 1
            delay = _backoff(pending.attempt)
            log.info("job %s: %s (%s); retry %d in %.1f s", pending.job.job_id, error.code, error, pending.attempt + 1, delay)
            self.events.retried(pending.job.job_id, reason=f"{error.code}: {error.message}")
            return Outcome(pending, "retry", delay_s=delay)
        record = self._record(pending, status="failed", error=error, prepared=prepared, batch_size=batch_size)
        return self._finish(pending, record)

    def _drop_poison(
        self, items: list[tuple[Pending, Prepared]], outcomes: list[Outcome], *, batch_size: int
    ) -> list[tuple[Pending, Prepared]]:
        """Count each delivery that reaches the model; quarantine jobs delivered too often."""
        first_tries = [pending for pending, _ in items if pending.deliveries == 0]
        counts = self.counters.count_deliveries([pending.job.job_id for pending in first_tries]) if first_tries else []
        for pending, count in zip(first_tries, counts, strict=True):
            pending.deliveries = count
        keep = []
        for pending, prepared in items:
            if pending.deliveries > self.settings.max_deliveries:
                error = PoisonJob(
                    f"delivered {pending.deliveries} times without finishing (limit {self.settings.max_deliveries}); quarantined"
                )
                self.stats.poisoned += 1
                log.error("job %s: %s", pending.job.job_id, error)
                record = self._record(pending, status="failed", error=error, prepared=prepared, batch_size=batch_size)
                outcomes.append(self._finish(pending, record))
            else:
                keep.append((pending, prepared))
        return keep

    def _finish(self, pending: Pending, record: Record) -> Outcome:
        """A placeholder outcome; complete() persists the record (retrying while storage is down) and sets its action."""
        placeholder = Outcome(pending, "ack", record=record)
        self._deferred.append((placeholder, record))
        return placeholder

    def _store(self, pending: Pending, record: Record) -> Outcome:
        try:
            stored = self._persist(record)
        except TransientError as exc:
            log.warning("job %s: giving its message back, record not stored: %s", pending.job.job_id, exc)
            return Outcome(pending, "requeue")
        with self._stats_lock:  # complete() runs this on several threads
            if stored.status == "succeeded":
                self.stats.jobs_done += 1
            else:
                self.stats.jobs_failed += 1
        if stored.status != "succeeded":
            self.counters.forget_submission(pending.job.job_id)
        self.events.stored(stored)  # task-succeeded or task-failed
        return Outcome(pending, "ack", record=stored)

    def _persist(self, record: Record) -> Record:
        """S3 first (the authority), then the result backend; each retried until it works or shutdown.

        An outage of our own stores never fails the job: the answer is kept and the message stays
        unacked, so nothing is lost if the worker dies meanwhile.
        """
        stored = self._retry_store(lambda: self.store.write(record), record.job_id, "S3")
        self._retry_store(lambda: self.store.publish(stored), record.job_id, "the result backend")
        return stored

    def _retry_store(self, write: Callable[[], Any], job_id: str, where: str) -> Any:
        delay = 0.5
        while True:
            try:
                return write()
            except TransientError as exc:
                if self.stopping.is_set():
                    raise
                log.warning("storing job %s in %s failed (%s); retrying in %.1f s", job_id, where, exc, delay)
                self._sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _STORE_BACKOFF_CAP_S)

    def _mark_started(self, job_ids: list[str]) -> None:
        def write() -> None:
            try:
                self.store.mark_started(job_ids)
            except BackendUnavailable as exc:
                log.warning("could not mark jobs started: %s", exc)
            except Exception:  # noqa: BLE001 - a status write must never cost the batch
                log.exception("could not mark jobs started")
            # Here, off the model thread; complete() waits for this write, so task-started
            # always goes out before the job's task-succeeded or task-failed.
            self.events.started(job_ids)

        self._status_writes.append(self._status_pool.submit(write))

    def _count_executions(self, job_ids: list[str]) -> list[int]:
        """Count one model run per job before it starts (worker/counters.py)."""
        counts = self.counters.count_executions(job_ids)
        self.stats.executions += len(job_ids)
        self.stats.duplicate_executions += sum(1 for count in counts if count > 1)
        return counts

    def _record(
        self,
        pending: Pending,
        *,
        status: Literal["succeeded", "failed"],
        prepared: Prepared,
        batch_size: int,
        answer: str | None = None,
        error: VQAError | None = None,
        infer_ms: float | None = None,
        executions: int = 0,
    ) -> Record:
        job = pending.job
        return Record(
            job_id=job.job_id,
            status=status,
            image_url=job.image_url,
            question=job.question,
            answer=answer,
            model=job.model if self.model is None else str(self.model.name),
            quantization=self.settings.quantization,
            generation=job.generation,
            attempts=max(pending.deliveries - 1, 0) + pending.attempt,
            executions=executions,
            worker=self.worker_name,
            batch_size=batch_size,
            submitted_at=job.submitted_at,
            started_at=pending.started_at,
            finished_at=utcnow(),
            fetch_ms=prepared.fetch_ms,
            infer_ms=infer_ms,
            error=None if error is None else ErrorInfo(code=error.code, message=error.message, retryable=error.retryable),
        )


def _backoff(attempt: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))
