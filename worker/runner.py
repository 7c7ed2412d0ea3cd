"""The inference stage: one micro-batch in, one outcome per job out.

Split in two so the model never waits for storage:

    infer(batch)        the model thread: counts each group's run (one Redis round trip, which
                        must land before the model runs: worker/counters.py), runs the engine,
                        builds the records; nothing else
    complete(finishing) the writer thread: resets the delivery counts of jobs the model came
                        back from, waits for the batch's STARTED writes, reports the batch to
                        the hooks and stores the records: each to S3 on a small pool, the
                        batch's to the result backend at once, then the batch's ``on_stored``
                        hooks (``on_stored_batch``: a hook may serve the batch in one round trip)

Every job gets its own outcome: a record written (then the message is acked), a retry later
(the message stays unacked), or a hand-back to the queue. One bad job never fails its batch
companions: a batch that raises is split in halves until the culprit stands alone, and a job
whose record cannot be stored is handed back alone.
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
from typing import Any, Literal

from producer.errors import (
    BackendUnavailable,
    OutOfMemory,
    PermanentError,
    PoisonJob,
    TransientError,
    VQAError,
)
from producer.image_grid import effective_grid
from producer.schema import ErrorInfo, Record, Usage, utcnow
from producer.settings import Settings
from worker.counters import JobCounters
from worker.cputime import CpuAccount
from worker.engine import Answer, Engine
from worker.hooks import BatchReport, Hooks, StoredJob
from worker.jobs import Outcome, Pending, Prepared
from worker.storage import RecordStore, Stored

log = logging.getLogger(__name__)

_STORE_BACKOFF_CAP_S = 10.0  # an S3 or backend outage is noticed to be over within this


@dataclass
class Finishing:
    """A batch whose model work is done and whose records are still to be stored (:meth:`BatchRunner.complete`)."""

    outcomes: list[Outcome]
    # Outcomes that are placeholders ("requeue") until their record is stored: complete() sets their action.
    to_store: list[tuple[Outcome, Record]] = field(default_factory=list)
    # The batch's STARTED writes (BatchRunner._mark_started); its records are stored after them.
    status_writes: list[Future[None]] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)  # jobs the model came back from
    reports: list[BatchReport] = field(default_factory=list)


@dataclass
class BatchStats:
    """The runner's own counters: the health check, the benchmarks and the worker's last log line read them."""

    batches: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    executions: int = 0
    duplicate_executions: int = 0
    oom_splits: int = 0
    retries: int = 0  # transient failures given another attempt
    poisoned: int = 0  # jobs quarantined after too many deliveries
    slowest_batch_s: float = 0.0  # longest generate call: the visibility timeout must cover it
    last_batch_s: float = 0.0  # the latest generate call: how often a busy worker looks at an empty queue (worker/consumer.py)
    generate_started_at: float | None = None  # time.monotonic() of the generate call in progress (worker/health.py)


@dataclass
class _Answered:
    """One job's result from the engine: its answer or its error, the time and size of the call that answered it."""

    answer: Answer | VQAError
    infer_ms: float | None
    size: int


class BatchRunner:
    """Turns a batch of prepared jobs into records, written to S3 and the result backend."""

    def __init__(
        self,
        *,
        settings: Settings,
        engine: Engine,
        store: RecordStore,
        counters: JobCounters,
        worker_name: str,
        stopping: threading.Event,
        hooks: Hooks | None = None,
        cpu: CpuAccount | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.counters = counters
        self.worker_name = worker_name
        self.stopping = stopping
        self.hooks = hooks or Hooks()
        self.stats = BatchStats()
        self.cpu = cpu or CpuAccount()
        self._survivors: list[str] = []  # model thread only: came back from the model, counts not yet reset
        self._sleep = sleep
        # STARTED states go to the result backend off the model thread (with `appendfsync always`
        # each write waits for a disk flush: ~5% of the model's time when it waited for them).
        # One thread keeps them in order; complete() stores a batch's records only after them,
        # so a job's state can never go back from SUCCESS to STARTED.
        self._status_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqa-status")
        # complete() stores a batch's records concurrently: S3 and Redis round trips overlap.
        self._store_pool = ThreadPoolExecutor(max_workers=min(8, settings.max_batch_size), thread_name_prefix="vqa-store")

    def run(self, batch: list[Pending]) -> list[Outcome]:
        return self.complete(self.infer(batch))

    # -- the model thread -------------------------------------------------------------------

    def infer(self, batch: list[Pending]) -> Finishing:
        """Everything up to the answers (the model thread's part); :meth:`complete` stores the records."""
        finishing = Finishing(outcomes=[])
        started_at = utcnow()
        runnable: list[Pending] = []
        for pending in batch:
            pending.started_at = pending.started_at or started_at
            prepared = pending.prepared or Prepared()
            if prepared.existing is not None:
                self._finish(finishing, pending, prepared.existing)
            elif prepared.error is not None:
                self._on_error(finishing, pending, prepared.error, batch_size=len(batch))
            else:
                runnable.append(pending)
        for group in _isolate_suspects(runnable):
            self._run_group(finishing, group, batch_size=len(batch))
        return finishing

    def _run_group(self, finishing: Finishing, group: list[Pending], *, batch_size: int) -> None:
        """One batched generate. The runs are counted before it, so a run that kills the worker counts too."""
        counts = self.counters.count_run(
            [pending.job.job_id for pending in group],
            count_delivery=[pending.deliveries == 0 for pending in group],
            max_deliveries=self.settings.max_deliveries,
            # The model came back from these since the last run: their counts start over now, in
            # this round trip, not only once the writer has stored their records. Otherwise a job
            # run alone before a poison job (in this batch or the next) would die with it uncleared
            # and be charged with its crash.
            survivors=self._survivors,
        )
        self._survivors = []
        runs: list[tuple[Pending, int]] = []
        for pending, count in zip(group, counts, strict=True):
            if count.deliveries is not None:
                pending.deliveries = count.deliveries
            if count.executions == 0:
                self.stats.poisoned += 1
                error = PoisonJob(
                    f"delivered {pending.deliveries} times without finishing (limit {self.settings.max_deliveries}); quarantined"
                )
                log.error("job %s: %s", pending.job.job_id, error, extra={"job_id": pending.job.job_id})
                self._finish(finishing, pending, self._record(pending, status="failed", error=error, batch_size=batch_size))
            else:
                runs.append((pending, count.executions))
        if not runs:
            return
        self._mark_started(finishing, [pending for pending, _ in runs])
        self.stats.batches += 1
        self.stats.executions += len(runs)
        duplicates = sum(1 for _, executions in runs if executions > 1)
        self.stats.duplicate_executions += duplicates
        splits_before = self.stats.oom_splits
        self.stats.generate_started_at = started = time.monotonic()
        try:
            results = self._generate([pending for pending, _ in runs])
        finally:
            self.stats.generate_started_at = None
        elapsed = time.monotonic() - started
        self.stats.slowest_batch_s = max(self.stats.slowest_batch_s, elapsed)
        self.stats.last_batch_s = elapsed
        finishing.survived.extend(pending.job.job_id for pending, _ in runs)
        self._survivors.extend(pending.job.job_id for pending, _ in runs)
        prepared = [pending.prepared or Prepared() for pending, _ in runs]
        costs = [item.cost for item in prepared]
        finishing.reports.append(
            BatchReport(
                size=len(runs),
                generate_s=elapsed,
                real_tokens=sum(costs),
                padded_tokens=len(costs) * max(costs),
                executions=len(runs),
                duplicate_executions=duplicates,
                oom_splits=self.stats.oom_splits - splits_before,
                batch_id=f"{self.worker_name}-{self.stats.batches}",
                job_ids=tuple(pending.job.job_id for pending, _ in runs),
                preprocess_s=tuple((item.preprocess_ms or 0.0) / 1000 for item in prepared),
            )
        )
        for (pending, executions), result in zip(runs, results, strict=True):
            if isinstance(result.answer, VQAError):
                self._on_error(finishing, pending, result.answer, batch_size=result.size)
                continue
            answer = result.answer
            record = self._record(
                pending,
                status="succeeded",
                answer=answer.text,
                batch_size=result.size,  # after an out-of-memory split, the half that answered it
                infer_ms=result.infer_ms,
                executions=executions,
                usage=Usage(
                    prompt_tokens=answer.prompt_tokens,
                    image_tokens=answer.image_tokens,
                    generated_tokens=answer.generated_tokens,
                    model_ms=round((result.infer_ms or 0.0) / result.size, 3),
                ),
            )
            self._finish(finishing, pending, record)

    def _generate(self, items: list[Pending]) -> list[_Answered]:
        """One batched generate; on failure split in halves so only the culprit fails."""
        generation = items[0].job.generation
        start = time.perf_counter()
        try:
            self._inject_faults(items)
            with self.cpu.measure("model"):
                answers = self.engine.generate_batch([(pending.prepared or Prepared()).inputs for pending in items], generation)
        except Exception as exc:  # noqa: BLE001 - isolate whatever broke; the error is kept per job
            error = exc if isinstance(exc, VQAError) else PermanentError(f"model failed: {type(exc).__name__}: {exc}", code="model_error")
            if len(items) == 1:
                log.warning("job %s failed in the model: %s", items[0].job.job_id, error, extra={"job_id": items[0].job.job_id})
                return [_Answered(error, None, 1)]
            if isinstance(error, OutOfMemory):
                self.stats.oom_splits += 1
            log.warning("batch of %d failed (%s); splitting to isolate it", len(items), error.code)
            middle = len(items) // 2
            return self._generate(items[:middle]) + self._generate(items[middle:])
        infer_ms = (time.perf_counter() - start) * 1000
        return [_Answered(answer, infer_ms, len(items)) for answer in answers]

    def _inject_faults(self, items: list[Pending]) -> None:
        """Test-only fault hooks (off by default): a batch with a marked question kills the worker or keeps the model busy; a batch larger than N runs out of memory."""
        marker = self.settings.fault_crash_on_question
        if marker and any(marker in pending.job.question for pending in items):
            log.critical("injected crash: batch of %d holds a job marked %r (VQA_FAULT_CRASH_ON_QUESTION)", len(items), marker)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(137)  # what the kernel's OOM killer or a segfaulting kernel leaves behind
        slow = self.settings.fault_slow_on_question
        if slow and any(slow in pending.job.question for pending in items):
            log.warning("injected slow batch: %.1f s busy in the model (VQA_FAULT_SLOW_ON_QUESTION)", self.settings.fault_slow_s)
            until = time.monotonic() + self.settings.fault_slow_s
            while time.monotonic() < until:
                sum(range(1000))  # busy in Python, as a generate loop is between kernels
        limit = self.settings.fault_oom_above_batch
        if limit and len(items) > limit:
            raise OutOfMemory(f"injected out-of-memory for a batch of {len(items)} (VQA_FAULT_OOM_ABOVE_BATCH={limit})")

    def _on_error(self, finishing: Finishing, pending: Pending, error: VQAError, *, batch_size: int) -> None:
        if isinstance(error, TransientError) and pending.attempt < self.settings.max_attempts:
            self.stats.retries += 1
            delay = _backoff(pending.attempt)
            log.info("job %s: %s (%s); retry %d in %.1f s", pending.job.job_id, error.code, error, pending.attempt + 1, delay,
                     extra={"job_id": pending.job.job_id})
            finishing.outcomes.append(Outcome(pending, "retry", delay_s=delay, error=error))
            return
        self._finish(finishing, pending, self._record(pending, status="failed", error=error, batch_size=batch_size))

    def _finish(self, finishing: Finishing, pending: Pending, record: Record) -> None:
        """A placeholder outcome that hands the message back unless complete() stores the record and sets "ack"."""
        placeholder = Outcome(pending, "requeue", record=record)
        finishing.outcomes.append(placeholder)
        finishing.to_store.append((placeholder, record))

    def _mark_started(self, finishing: Finishing, group: list[Pending]) -> None:
        jobs = [pending.job for pending in group]

        def write() -> None:
            try:
                self.store.mark_started([job.job_id for job in jobs])
            except BackendUnavailable as exc:
                log.warning("could not mark jobs started: %s", exc)
            except Exception:  # noqa: BLE001 - a status write must never cost the batch
                log.exception("could not mark jobs started")
            # Here, off the model thread; complete() waits for this, so on_started always comes
            # before the job's on_stored.
            self.hooks.on_started(jobs)

        finishing.status_writes.append(self._status_pool.submit(write))

    # -- the writer thread ------------------------------------------------------------------

    def complete(self, finishing: Finishing) -> list[Outcome]:
        """Store the records of an inferred batch; every outcome is final afterwards.

        In steps, so Redis costs a few round trips per batch, not a few per job: each record to S3
        (concurrently), the failed records beside the new successes deleted at once (where their
        marks say one may exist), the batch's records to the result backend at once, then the
        batch's ``on_stored`` hooks at once. A job whose step fails is handed back alone.
        """
        if finishing.survived:
            self.counters.survived(finishing.survived)
        wait(finishing.status_writes)
        # Before the stores: a hook that correlates jobs with their batch (worker/joblog.py) knows
        # the batch by the time each job's on_stored comes.
        for report in finishing.reports:
            self.hooks.on_batch(report)
        written = list(self._store_pool.map(lambda item: self._write(item[0].pending, item[1]), finishing.to_store))
        stored = [(placeholder, found) for (placeholder, _), found in zip(finishing.to_store, written, strict=True) if found is not None]
        stored = self._drop_failed(stored)
        if not self._mirror([found for _, found in stored]):
            published = list(self._store_pool.map(lambda item: self._publish_alone(item[0].pending, item[1]), stored))
            stored = [item for item, done in zip(stored, published, strict=True) if done]
        failures = self._on_stored(stored)
        for (placeholder, found), failure in zip(stored, failures, strict=True):
            outcome = self._settled(placeholder.pending, found, failure)
            placeholder.action, placeholder.record = outcome.action, outcome.record
        return finishing.outcomes

    def _write(self, pending: Pending, record: Record) -> Stored | None:
        """The job's record in S3 (the authority); None when its message goes back instead.

        Whatever goes wrong here concerns this job alone: a transient failure hands its message
        back, an unexpected error too (logged with its traceback), and a record that cannot be
        stored for good (an unreadable object at its key) becomes a failed record saying why.
        """
        job_id = pending.job.job_id

        def write() -> Stored:
            try:
                return self._write_s3(pending, record)
            except PermanentError as exc:
                log.error("job %s: %s", job_id, exc, extra={"job_id": job_id})
                return self._write_s3(pending, self._record(pending, status="failed", error=exc, batch_size=record.batch_size))

        return self._or_hand_back(job_id, write)

    @staticmethod
    def _or_hand_back(job_id: str, step: Callable[[], Stored]) -> Stored | None:
        """One job's storing step; None (its message goes back) when it fails, transiently or by surprise: the rest of its batch goes on."""
        try:
            return step()
        except TransientError as exc:
            log.warning("job %s: giving its message back, record not stored: %s", job_id, exc, extra={"job_id": job_id})
        except Exception:  # noqa: BLE001 - one job's surprise must not strand its batch
            log.exception("job %s: storing its record failed unexpectedly; giving its message back", job_id, extra={"job_id": job_id})
        return None

    def _write_s3(self, pending: Pending, record: Record) -> Stored:
        """S3, retried until it works or shutdown: an outage of our own stores never fails the job.

        The answer is kept and the message stays unacked, so nothing is lost if the worker dies
        meanwhile. A record that was found in S3 already (a redelivery) is not written again.
        """
        existing = pending.prepared.existing if pending.prepared is not None else None
        if existing is not None and record is existing:
            return Stored(existing, created=False)
        # A created success's failed record, if any, is deleted for the batch at once (_drop_failed).
        return self._retry_store(lambda: self.store.write(record, drop_failed=False), f"job {record.job_id}", "S3", job_id=record.job_id)

    def _drop_failed(self, stored: list[tuple[Outcome, Stored]]) -> list[tuple[Outcome, Stored]]:
        """Delete the failed records (where a mark says one may exist) of the batch's created successes at once; what may go on."""
        created = [found.record.job_id for _, found in stored if found.created and found.record.status == "succeeded"]
        try:
            self.store.drop_failed(created)
        except Exception:  # noqa: BLE001 - Redis and S3 errors are handled inside; a surprise hands these jobs back
            log.exception("deleting the failed records beside %d new successes failed unexpectedly; giving their messages back", len(created))
            going_back = set(created)
            return [(placeholder, found) for placeholder, found in stored if found.record.job_id not in going_back]
        return stored

    def _mirror(self, stored: list[Stored]) -> bool:
        """The batch's records into the result backend at once, retried until it works or shutdown; False: each job tries alone."""
        if not stored:
            return True
        try:
            self._retry_store(lambda: self.store.publish_batch([found.record for found in stored]), f"{len(stored)} jobs", "the result backend")
            return True
        except TransientError:
            return False  # shutting down with the backend away: each job's own try gives its message back
        except Exception:  # noqa: BLE001 - a batch's surprise must not strand its jobs
            log.exception("writing %d records to the result backend failed unexpectedly; each job tries alone", len(stored))
            return False

    def _publish_alone(self, pending: Pending, stored: Stored) -> bool:
        """The job's own backend write, after the batch's failed; False: its message goes back (the placeholder's requeue)."""
        job_id = pending.job.job_id

        def publish() -> Stored:
            self._retry_store(lambda: self.store.publish(stored.record), f"job {job_id}", "the result backend", job_id=job_id)
            return stored

        return self._or_hand_back(job_id, publish) is not None

    def _on_stored(self, stored: list[tuple[Outcome, Stored]]) -> list[TransientError | None]:
        """The batch's ``on_stored`` hooks at once (a hook may serve them in one round trip); per job, a failure that hands it back."""
        if not stored:
            return []
        items = [StoredJob(found.record, placeholder.pending.job, found.created) for placeholder, found in stored]
        try:
            return self.hooks.on_stored_batch(items)
        except Exception:  # noqa: BLE001 - Hooks catches each hook's errors; a surprise here hands the batch back
            log.exception("the on_stored hooks of %d jobs failed unexpectedly; giving their messages back", len(items))
            return [TransientError("the on_stored hooks failed unexpectedly")] * len(items)

    def _settled(self, pending: Pending, stored: Stored, failure: TransientError | None) -> Outcome:
        """"ack" once the record is stored and every hook is done with it; "requeue" when a hook failed transiently (Hooks logged why)."""
        job_id = pending.job.job_id
        if failure is not None:
            return Outcome(pending, "requeue")
        if stored.record.status == "succeeded":
            self.stats.jobs_done += 1
        else:
            self.stats.jobs_failed += 1
            self.counters.forget_submission(job_id)
        return Outcome(pending, "ack", record=stored.record)

    def _retry_store(self, write: Callable[[], Any], what: str, where: str, *, job_id: str | None = None) -> Any:
        delay = 0.5
        while True:
            try:
                return write()
            except TransientError as exc:
                if self.stopping.is_set():
                    raise
                log.warning("storing %s in %s failed (%s); retrying in %.1f s", what, where, exc, delay,
                            extra={"job_id": job_id} if job_id else None)
                self._sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _STORE_BACKOFF_CAP_S)

    def _record(
        self,
        pending: Pending,
        *,
        status: Literal["succeeded", "failed"],
        batch_size: int,
        answer: str | None = None,
        error: VQAError | None = None,
        infer_ms: float | None = None,
        executions: int = 0,
        usage: Usage | None = None,
    ) -> Record:
        job = pending.job
        prepared = pending.prepared or Prepared()
        return Record(
            job_id=job.job_id,
            status=status,
            image_url=job.image_url,
            question=job.question,
            answer=answer,
            model=str(self.engine.name),
            quantization=str(self.engine.quantization),
            generation=job.generation,
            image_grid=effective_grid(job.image_grid, self.settings.image_grid),
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
            usage=usage,
            bulk_id=job.bulk_id,
            custom_id=job.custom_id,
        )


def _isolate_suspects(items: list[Pending]) -> list[list[Pending]]:
    """First deliveries run together; a job that reached a model before may be what killed that worker, so it runs alone.

    Otherwise its batch companions would be charged with its crashes and quarantined with it.
    """

    def earlier(pending: Pending) -> int:
        if pending.deliveries:
            return pending.deliveries - 1
        return (pending.prepared or Prepared()).earlier_deliveries

    fresh = [pending for pending in items if earlier(pending) == 0]
    return ([fresh] if fresh else []) + [[pending] for pending in items if earlier(pending) > 0]


def _backoff(attempt: int, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))
