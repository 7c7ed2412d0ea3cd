"""The inference stage: one micro-batch in, one outcome per job out.

Runs on the worker's model thread. Every job gets its own outcome: a record written
(then the message is acked), a retry later (the message stays unacked), or a hand-back
to the queue. One bad job never fails its batch companions: a batch that raises is split
in halves until the culprit stands alone.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import redis

from producer import keys
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
from worker.storage import RecordStore

log = logging.getLogger(__name__)

_COUNTER_TTL_S = 7 * 24 * 3600


@dataclass
class Prepared:
    """What the fetch stage produced for a job: an image, an existing record, or an error."""

    image: Any = None
    existing: Record | None = None
    error: VQAError | None = None
    fetch_ms: float | None = None


@dataclass
class Pending:
    """A received job. ``message`` is the kombu message: only the consumer thread touches it."""

    job: Job
    message: Any
    received_at: float
    attempt: int = 1
    prepared: Future[Prepared] | None = None
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
class BatchStats:
    """Counters the metrics endpoint and the benchmarks read."""

    batches: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    executions: int = 0
    duplicate_executions: int = 0
    oom_splits: int = 0
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
    ) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.counters = counters
        self.worker_name = worker_name
        self.stopping = stopping
        self.stats = BatchStats()
        self._sleep = sleep

    def run(self, batch: list[Pending]) -> list[Outcome]:
        started_at = utcnow()
        outcomes: list[Outcome] = []
        runnable: list[tuple[Pending, Prepared]] = []
        for pending in batch:
            pending.started_at = pending.started_at or started_at
            prepared = pending.prepared.result() if pending.prepared else Prepared()
            if prepared.existing is not None:
                outcomes.append(self._finish(pending, prepared.existing))
            elif prepared.error is not None:
                outcomes.append(self._on_error(pending, prepared.error, prepared, batch_size=len(batch)))
            else:
                runnable.append((pending, prepared))
        runnable = self._drop_poison(runnable, outcomes, batch_size=len(batch))
        if runnable:
            self.stats.batches += 1
            self.stats.batch_sizes.append(len(runnable))
            self._mark_started([pending.job.job_id for pending, _ in runnable])
            results = self._generate(runnable)
            for (pending, prepared), (answer, infer_ms) in zip(runnable, results, strict=True):
                if isinstance(answer, VQAError):
                    outcomes.append(self._on_error(pending, answer, prepared, batch_size=len(runnable)))
                    continue
                executions = self._count_execution(pending.job.job_id)
                record = self._record(
                    pending,
                    status="succeeded",
                    answer=answer,
                    prepared=prepared,
                    batch_size=len(runnable),
                    infer_ms=infer_ms,
                    executions=executions,
                )
                outcomes.append(self._finish(pending, record))
        return outcomes

    # -- the model --------------------------------------------------------------------------

    def _generate(self, items: list[tuple[Pending, Prepared]]) -> list[tuple[str | VQAError, float | None]]:
        """One batched generate; on failure split in halves so only the culprit fails."""
        generation = items[0][0].job.generation
        start = time.perf_counter()
        try:
            self._inject_faults(items)
            answers = self.model.generate(
                [prepared.image for _, prepared in items], [pending.job.question for pending, _ in items], generation
            )
        except Exception as exc:  # noqa: BLE001 - isolate whatever broke; the error is kept per job
            error = exc if isinstance(exc, VQAError) else PermanentError(f"model failed: {type(exc).__name__}: {exc}", code="model_error")
            if len(items) == 1:
                log.warning("job %s failed in the model: %s", items[0][0].job.job_id, error)
                return [(error, None)]
            if isinstance(error, OutOfMemory):
                self.stats.oom_splits += 1
            log.warning("batch of %d failed (%s); splitting to isolate it", len(items), error.code)
            middle = len(items) // 2
            return self._generate(items[:middle]) + self._generate(items[middle:])
        infer_ms = (time.perf_counter() - start) * 1000
        return [(answer, infer_ms) for answer in answers]

    def _inject_faults(self, items: list[tuple[Pending, Prepared]]) -> None:
        """Test-only fault hook (off by default): pretend a batch larger than N runs out of memory."""
        limit = self.settings.fault_oom_above_batch
        if limit and len(items) > limit:
            raise OutOfMemory(f"injected out-of-memory for a batch of {len(items)} (VQA_FAULT_OOM_ABOVE_BATCH={limit})")

    # -- outcomes ---------------------------------------------------------------------------

    def _on_error(self, pending: Pending, error: VQAError, prepared: Prepared, *, batch_size: int) -> Outcome:
        if isinstance(error, TransientError) and pending.attempt < self.settings.max_attempts:
            delay = _backoff(pending.attempt)
            log.info("job %s: %s (%s); retry %d in %.1f s", pending.job.job_id, error.code, error, pending.attempt + 1, delay)
            return Outcome(pending, "retry", delay_s=delay)
        record = self._record(pending, status="failed", error=error, prepared=prepared, batch_size=batch_size)
        return self._finish(pending, record)

    def _drop_poison(
        self, items: list[tuple[Pending, Prepared]], outcomes: list[Outcome], *, batch_size: int
    ) -> list[tuple[Pending, Prepared]]:
        """Count each delivery that reaches the model; quarantine jobs delivered too often."""
        first_tries = [(pending, prepared) for pending, prepared in items if pending.deliveries == 0]
        if first_tries:
            try:
                pipe = self.counters.pipeline(transaction=False)
                for pending, _ in first_tries:
                    pipe.incr(keys.deliveries_key(pending.job.job_id))
                    pipe.expire(keys.deliveries_key(pending.job.job_id), _COUNTER_TTL_S)
                counts = pipe.execute()[::2]
            except redis.RedisError as exc:
                log.warning("cannot count deliveries (%s); poison detection paused for this batch", type(exc).__name__)
                counts = [1] * len(first_tries)
            for (pending, _), count in zip(first_tries, counts, strict=True):
                pending.deliveries = int(count)
        keep = []
        for pending, prepared in items:
            if pending.deliveries > self.settings.max_deliveries:
                error = PoisonJob(
                    f"delivered {pending.deliveries} times without finishing (limit {self.settings.max_deliveries}); quarantined"
                )
                record = self._record(pending, status="failed", error=error, prepared=prepared, batch_size=batch_size)
                outcomes.append(self._finish(pending, record))
            else:
                keep.append((pending, prepared))
        return keep

    def _finish(self, pending: Pending, record: Record) -> Outcome:
        """Persist the record (retrying while storage is down), then ask for the ack."""
        try:
            stored = self._persist(record)
        except TransientError as exc:
            log.warning("job %s: giving its message back, record not stored: %s", pending.job.job_id, exc)
            return Outcome(pending, "requeue")
        if stored.status == "succeeded":
            self.stats.jobs_done += 1
        else:
            self.stats.jobs_failed += 1
            self._forget_submission(pending.job.job_id)
        return Outcome(pending, "ack", record=stored)

    def _persist(self, record: Record) -> Record:
        delay = 0.5
        while True:
            try:
                stored = self.store.write(record)
                self.store.publish(stored)
                return stored
            except TransientError as exc:
                if self.stopping.is_set():
                    raise
                log.warning("storing job %s failed (%s); retrying in %.1f s", record.job_id, exc, delay)
                self._sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 30.0)

    def _mark_started(self, job_ids: list[str]) -> None:
        try:
            self.store.mark_started(job_ids)
        except BackendUnavailable as exc:
            log.warning("could not mark jobs started: %s", exc)

    def _count_execution(self, job_id: str) -> int:
        self.stats.executions += 1
        try:
            count = int(self.counters.incr(keys.executions_key(job_id)))
            self.counters.expire(keys.executions_key(job_id), _COUNTER_TTL_S)
        except redis.RedisError:
            return 1
        if count > 1:
            self.stats.duplicate_executions += 1
            log.warning("job %s ran the model %d times (redelivery)", job_id, count)
        return count

    def _forget_submission(self, job_id: str) -> None:
        """A failed job may be submitted again; drop the producer's 'already queued' mark."""
        try:
            self.counters.delete(keys.submitted_key(job_id))
        except redis.RedisError:
            pass

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
