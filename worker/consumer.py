"""The batching consumer: Celery messages in from Redis, micro-batches out to the model thread, acks back.

Why our own consumer instead of celery-batches: a message must be acknowledged only after
its record is stored, retried per job, handed back on shutdown, and counted for poison
detection — celery-batches acks a failed batch under acks_late, has no per-request retry,
and keeps buffered messages on shutdown. This loop speaks Celery's task protocol (v2, JSON)
on the same queue, so producers use plain Celery and ``AsyncResult`` works.

Messages are taken off Redis by worker/broker.py (pop and record as unacked in one atomic
step; kombu's BRPOP-then-record loses a message when Redis or the worker dies in between),
checked by worker/intake.py (a refused entry goes to the dead-letter list), and settled
through worker/ledger.py, only after the job's record is stored.

Threads, and what each one owns:

    consumer (run)   every message and the ledger: receive, ack, requeue, dead-letter; the
                     batcher, the retry list and the jobs being fetched; hands batches to
                     the model thread; calls on_received / on_rejected / on_retried hooks
    fetch pool       one job at a time (JobPreparer): existing record, fetch, decode,
                     preprocess; writes only ``pending.prepared``, then queues the job back
    model            BatchRunner.infer: the engine, plus the one Redis round trip that must
                     precede it (worker/counters.py); no hook, no other I/O
    writer           BatchRunner.complete for each inferred batch, in order, while the model
                     runs the next one; with the runner's pools:
      status         STARTED writes to the result backend and on_started hooks, in order
      store pool     S3 writes, per job (on_stored hooks: the writer thread, per batch)
    events           Celery events (worker/events.py), when VQA_SEND_EVENTS is on
    control          Celery remote control (worker/control.py): reads the job board, writes
                     revokes into the in-memory set (worker/cancels.py)
    metrics          the HTTP endpoint (worker/metrics.py), when VQA_METRICS_PORT is set
    heartbeat        this worker's heartbeat in Redis (worker/heartbeat.py): while it beats,
                     the messages this worker took stay its own however long a batch takes

They hand work to each other through queues (``_batches``, ``_finishing``, ``_outcomes``,
``_ready``); the only state read across threads is counters (BatchStats, LedgerStats), the
health snapshot (:meth:`BatchingConsumer.progress`), the job board (``board``: where each held
job is, worker/board.py) and the in-memory revokes (``cancels.revoked``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

import redis

from producer.errors import MessageRejected, VQAError
from producer.image_grid import effective_grid
from producer.schema import Job
from producer.settings import Settings
from worker.batching import RUNNING_AND_QUEUED, MicroBatcher, prefetch_batches
from worker.board import JobBoard
from worker.broker import Delivery, RedisQueue, new_consumer_id, reconnect_delay
from worker.cancels import CancelCheck
from worker.health import Progress
from worker.heartbeat import Heartbeat
from worker.hooks import Hooks
from worker.intake import SignatureVerifier, read_message
from worker.jobs import Outcome, Pending, Prepared
from worker.ledger import Action, Ledger
from worker.runner import BatchRunner, Finishing

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.2  # the longest the loop sleeps: a stop, a due retry or a broker retry is noticed within this
_EMPTY_POLL_S = 0.05  # the queue was empty: look again this soon (it is polled, see worker/broker.py)
# ... unless the model is busy: a job taken now waits for the running batch anyway, so the pause
# doubles per empty look, up to half a batch's run time and at most this (an empty look costs
# the worker a script's round trip, ~0.15 ms of CPU; at the end of each burst they came to about
# one per job at batch 8: docs/benchmarks/queue-cost/fewer-round-trips).
_EMPTY_POLL_BUSY_MAX_S = 0.4
_RESTORE_EVERY_S = 1.0  # how often this worker restores dead workers' messages (worker/broker.py)
_LOOP_ERROR_PAUSE_MAX_S = 5.0  # after unexpected errors in a row, the loop pauses up to this long
# Batches handed to the model thread whose outcomes are not back: the ones the prefetch holds
# (one running, one queued behind it) and one whose records the writer is storing.
_MAX_IN_FLIGHT = RUNNING_AND_QUEUED + 1


class BatchingConsumer:
    """Consumes ``settings.queue`` and runs jobs in micro-batches until :meth:`stop` is called."""

    def __init__(
        self,
        *,
        settings: Settings,
        runner: BatchRunner,
        prepare: Callable[[Job], Prepared],
        stopping: threading.Event,
        cancels: CancelCheck,
        hooks: Hooks | None = None,
        broker: RedisQueue | None = None,
        worker_name: str = "vqa",
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.hooks = hooks or Hooks()
        self._prepare = prepare  # runs on the fetch pool (worker/preparing.py); never raises
        self.stopping = stopping
        self.batcher: MicroBatcher[Pending] = MicroBatcher(
            max_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000,
            max_tokens=settings.max_batch_tokens,
        )
        # One batch in the model, one filling up behind it (and one more to choose from when padding-aware).
        self.prefetch = prefetch_batches(settings.max_batch_tokens) * settings.max_batch_size
        self._fetch_pool = ThreadPoolExecutor(max_workers=settings.fetch_concurrency, thread_name_prefix="vqa-fetch")
        self._batches: queue.Queue[list[Pending] | None] = queue.Queue(maxsize=1)
        self._outcomes: queue.Queue[list[Outcome]] = queue.Queue()
        # Batches handed to the model thread whose outcomes are not back (at most _MAX_IN_FLIGHT).
        self._in_flight = 0
        self._handed = 0  # batches put on the model queue (consumer thread)
        self._inferred = 0  # batches the model thread has finished with (model thread; only ever grows)
        self._fetching: dict[int, Pending] = {}  # id() -> job whose fetch/preprocess is running
        self._ready: queue.SimpleQueue[Pending] = queue.SimpleQueue()  # fetched, not yet batched
        self._delayed: list[Pending] = []  # transient failures waiting for their retry time
        self.broker = broker or RedisQueue.from_url(
            settings.broker_url, queue=settings.queue, consumer_id=new_consumer_id(worker_name),
            heartbeat_timeout_s=settings.heartbeat_timeout_s, master_name=settings.sentinel_master_name,
        )
        self.heartbeat = Heartbeat(self.broker, interval_s=settings.heartbeat_interval_s)
        self.cancels = cancels
        # Where each held job is (reserved, scheduled, active), for remote control (worker/control.py).
        self.board = JobBoard()
        # Every unacked message, by job id; acks and hand-backs go through it (see worker/ledger.py).
        self.ledger = Ledger(self.broker)
        self._loop_errors = 0  # unexpected errors in a row in the consumer loop
        self._broker_backoff = 0.0  # > 0 while Redis is unreachable
        self._broker_retry_at = 0.0
        self._next_restore = 0.0
        self._next_pop = 0.0  # after an empty pop, Redis is asked again only this late
        self._empty_pause = _EMPTY_POLL_S
        self._loop_at: float | None = None  # when the consumer loop last went round (worker/health.py)
        # Set by the other threads when they hand the loop something (a fetched job, a finished
        # batch, outcomes): it sleeps until then instead of polling them every few milliseconds,
        # which cost ~6 ms of CPU per job at batch 8 (the GIL handed back and forth ~100 times a second).
        self._wake = threading.Event()
        self._model_thread = threading.Thread(target=self._model_loop, name="vqa-model", daemon=True)
        # Stores each batch's records while the model runs the next one (BatchRunner.complete).
        self._finishing: queue.SimpleQueue[tuple[list[Pending], Finishing] | None] = queue.SimpleQueue()
        self._writer_thread = threading.Thread(target=self._writer_loop, name="vqa-writer", daemon=True)
        # Signing on: only messages signed by a trusted certificate become jobs (worker/intake.py).
        self._verifier = (
            SignatureVerifier(settings.security_cert_store, digest=settings.security_digest)
            if settings.security_cert_store is not None
            else None
        )

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped; then hand back what was not started and finish what was."""
        self._model_thread.start()
        self._writer_thread.start()
        self.heartbeat.start()  # before the first pop: what this worker takes is never ownerless
        log.info("consuming %r as %s (batch %d, delay %d ms, prefetch %d)", self.settings.queue, self.broker.consumer_id,
                 self.settings.max_batch_size, self.settings.max_batch_delay_ms, self.prefetch)
        try:
            while not self.stopping.is_set():
                self._loop_at = time.monotonic()
                self._wake.clear()  # before looking: whatever arrives from here on wakes the wait below
                try:
                    received = self._receive()
                    self._tick()
                except Exception:  # noqa: BLE001 - a bug must not stop the worker holding messages
                    # As dramatiq restarts its consumer: log it and go round again, after a pause
                    # that grows while the errors repeat. The held messages stay held.
                    self._loop_errors += 1
                    pause = min(0.1 * 2 ** min(self._loop_errors, 10), _LOOP_ERROR_PAUSE_MAX_S)
                    log.exception("unexpected error in the consumer loop (%d in a row); going on in %.1f s", self._loop_errors, pause)
                    self.stopping.wait(pause)
                    continue
                self._loop_errors = 0
                if not received:
                    self._wake.wait(self._poll_timeout())
        finally:
            # Whatever ended the loop (a signal, or an error that is not an Exception), the held
            # messages go back now rather than after the heartbeat timeout.
            self._shutdown()

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def progress(self) -> Progress:
        """What /healthz judges (worker/health.py); safe to call from any thread."""
        now = time.monotonic()
        loop_at, generate_at = self._loop_at, self.runner.stats.generate_started_at
        return Progress(
            loop_age_s=None if loop_at is None else round(now - loop_at, 3),
            model_thread_alive=self._model_thread.is_alive(),
            writer_thread_alive=self._writer_thread.is_alive(),
            broker_reachable=not self._broker_backoff,
            generate_running_s=None if generate_at is None else round(now - generate_at, 3),
            jobs_held=len(self.ledger),
        )

    # -- the consumer thread ----------------------------------------------------------------

    def _receive(self) -> int:
        """Restore dead workers' messages (about once a second), then take what the prefetch has room for."""
        now = time.monotonic()
        if now < self._broker_retry_at:
            return 0
        try:
            if now >= self._next_restore:
                self._next_restore = now + _RESTORE_EVERY_S
                restored = self.broker.restore_expired(self.settings.visibility_timeout)
                self.ledger.stats.restored += restored
                if restored:
                    log.warning("put %d messages of dead workers (or of old workers' shared set) back on the queue", restored)
            room = self.prefetch - len(self.ledger)
            asked = room > 0 and now >= self._next_pop
            deliveries = self.broker.pop(room) if asked else []
        except redis.RedisError as exc:
            # Redis away (restart, network): keep the jobs we hold, retry with backoff. Nothing
            # is lost meanwhile: what we took is recorded as unacked in Redis (AOF keeps it).
            self._broker_backoff = reconnect_delay(self._broker_backoff)
            self._broker_retry_at = now + self._broker_backoff
            log.warning("broker unreachable (%s); retrying in %.1f s", type(exc).__name__, self._broker_backoff)
            return 0
        if self._broker_backoff:
            log.info("broker reachable again")
            self._broker_backoff = 0.0
        if asked:
            self._next_pop = now + self._pause_after(empty=not deliveries)
        for delivery in deliveries:
            self._on_delivery(delivery)
        return len(deliveries)

    @property
    def _model_busy(self) -> bool:
        """A batch is in the model or queued for it."""
        return self._handed > self._inferred

    def _pause_after(self, *, empty: bool) -> float:
        """How long before the next pop: none after messages; after an empty one, longer while the model is busy."""
        if not empty or not self._model_busy:
            self._empty_pause = _EMPTY_POLL_S
            return _EMPTY_POLL_S if empty else 0.0
        longest = min(_EMPTY_POLL_BUSY_MAX_S, max(_EMPTY_POLL_S, self.runner.stats.last_batch_s / 2))
        pause = min(self._empty_pause, longest)
        self._empty_pause = min(2 * pause, longest)
        return pause

    def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message, job = read_message(delivery.tag, delivery.raw, verifier=self._verifier)
        except MessageRejected as exc:
            log.error("rejected a message from %r (dead-lettered): %s", self.settings.queue, exc.message[:300])
            self._dead_letter(delivery, exc.message)
            return
        if not self.ledger.hold(job.job_id, message.delivery_tag):
            # Already held here (a duplicate publish, or redelivered while we were slow with it):
            # settled with the first delivery's outcome instead of running the model twice.
            log.info("job %s delivered again while held; it follows the first delivery", job.job_id, extra={"job_id": job.job_id})
            return
        self.board.reserve(job, message.properties)
        self.hooks.on_received(job, message.headers)
        self._enqueue(Pending(job=job, message=message, received_at=time.monotonic()))

    def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        try:
            self.broker.dead_letter(delivery.tag, delivery.raw, reason=reason)
        except redis.RedisError:
            return  # still ours, unacked: it comes back when this worker retires or dies, and is refused again
        self.hooks.on_rejected(delivery.tag, reason)

    def _tick(self) -> None:
        if not self._broker_backoff:
            self.ledger.retry_unsettled()
        self._apply_outcomes()
        self._release_delayed()
        self._collect_ready()
        while self._batches.empty() and self._in_flight < _MAX_IN_FLIGHT:
            model_busy = self._model_busy
            # Idle model: any due batch. Busy model: only a complete one, queued behind it, and
            # not while the writer still holds an earlier batch (its messages fill the prefetch).
            if model_busy and (self._in_flight >= RUNNING_AND_QUEUED or not self._worth_queueing()):
                return
            batch = self.batcher.take(complete_only=model_busy)
            if not batch:
                return
            self._stop(batch, self.cancels.reasons)
            self._in_flight += 1
            self._handed += 1
            self._batches.put(batch)

    def _stop(self, batch: list[Pending], check: Callable[[list[Job]], dict[str, VQAError]]) -> None:
        """A look before the model: a job cancelled (or expired) while it waited in the batcher does not run.

        It stays in the batch with the reason as its error, so the runner writes its record.
        ``check`` is ``cancels.reasons`` on the consumer thread, ``cancels.local_reasons`` (no
        I/O) on the model thread.
        """
        waiting = [pending.job for pending in batch if pending.prepared is not None and pending.prepared.inputs is not None]
        reasons = check(waiting) if waiting else {}
        for pending in batch:
            error = reasons.get(pending.job.job_id)
            if error is not None:
                fetched = pending.prepared
                pending.prepared = Prepared(error=error, fetch_ms=fetched.fetch_ms if fetched is not None else None)

    def _worth_queueing(self) -> bool:
        """Padding-aware: choose the next batch from two batches' worth of ready jobs, not from whatever is ready first."""
        return not self.settings.max_batch_tokens or len(self.batcher) >= 2 * self.settings.max_batch_size

    def _poll_timeout(self) -> float:
        """How long the loop may sleep: until the batcher's next batch is due or the broker may be asked again; the threads wake it sooner."""
        now = time.monotonic()
        # A busy model takes only complete batches, and those come with a fetch: then the batcher's
        # due time wakes nothing up (the model finishing does).
        model_busy = self._model_busy or self._in_flight >= _MAX_IN_FLIGHT
        due = None if model_busy else self.batcher.next_due_in()
        timeout = _IDLE_POLL_S if due is None else min(_IDLE_POLL_S, max(due, 0.005))
        if self.prefetch - len(self.ledger) > 0 and not self._broker_backoff:
            # Room for more: look at the queue again once an empty pop's pause is over (at once if it is).
            timeout = min(timeout, max(self._next_pop - now, 0.0))
        if not self._ready.empty() or not self._outcomes.empty():
            timeout = 0.0  # handed over since the loop looked
        return timeout

    def _enqueue(self, pending: Pending) -> None:
        # The batcher only gets jobs whose image is fetched and preprocessed: a batch never
        # waits on a slow download, and padding-aware batching needs the prompt length.
        self._fetching[id(pending)] = pending
        pending.prepared = None  # a retry fetches again
        self._fetch_pool.submit(self._prepare_into, pending)

    def _prepare_into(self, pending: Pending) -> None:
        """Fetch pool: store the result on the job itself, then hand it to the consumer thread.

        Not a Future with a done-callback: the future would keep its callback, the callback the
        job, and the job the future, a reference cycle that holds each job's pixel values until
        a full garbage collection (rare beside a loaded model); the worker grew ~10 MiB per
        1,000 jobs that way (docs/benchmarks/README.md).
        """
        pending.prepared = self._prepare(pending.job)
        self._ready.put(pending)
        self._wake.set()

    def _collect_ready(self) -> None:
        while True:
            try:
                pending = self._ready.get_nowait()
            except queue.Empty:
                return
            if self._fetching.pop(id(pending), None) is None:
                continue  # handed back on shutdown meanwhile
            prepared = pending.prepared or Prepared()
            needs_model = prepared.inputs is not None
            # Jobs that need no model (record exists, fetch failed) are batched apart from those
            # that do; those that do, by generation settings and image grid (one grid a batch).
            if needs_model:
                key: Hashable = (pending.job.generation, effective_grid(pending.job.image_grid, self.settings.image_grid))
            else:
                key = ("no-model", pending.job.generation)
            # One image's questions together: they share its prefill (worker/prefix.py).
            self.batcher.add(key, pending, cost=prepared.cost, arrived_at=pending.received_at, affinity=prepared.image_key)

    def _apply_outcomes(self) -> None:
        while True:
            try:
                outcomes = self._outcomes.get_nowait()
            except queue.Empty:
                return
            self._in_flight = max(0, self._in_flight - 1)
            settles: list[tuple[str, Action, float | None]] = []
            for outcome in outcomes:
                pending = outcome.pending
                if outcome.action == "retry" and not self.stopping.is_set():
                    pending.attempt += 1
                    pending.not_before = time.monotonic() + outcome.delay_s
                    self._delayed.append(pending)
                    self.board.schedule(pending.job.job_id, delay_s=outcome.delay_s)
                    if outcome.error is not None:
                        self.hooks.on_retried(pending.job, outcome.error, outcome.delay_s)
                    continue
                # Shutting down, a retry goes back to the queue at once (its attempt is not used up).
                action: Action = "ack" if outcome.action == "ack" else "requeue"
                settles.append((pending.job.job_id, action, pending.received_at))
            self._settle_many(settles)

    def _settle(self, job_id: str, action: Action, *, received_at: float | None = None) -> None:
        self._settle_many([(job_id, action, received_at)])

    def _settle_many(self, settles: list[tuple[str, Action, float | None]]) -> None:
        """The jobs are no longer held here: their messages are acked or handed back (worker/ledger.py), a batch's acks at once."""
        self.ledger.settle_many(settles)
        for job_id, action, _ in settles:
            self.board.release(job_id, acked=action == "ack")

    def _release_delayed(self) -> None:
        """Jobs whose retry is due go back to the fetch stage; so do cancelled and expired ones at once.

        The check is the in-memory one (no I/O): the fetch stage then reads Redis and ends them.
        """
        if not self._delayed:
            return
        now = time.monotonic()
        stopped = self.cancels.local_reasons([p.job for p in self._delayed if p.not_before > now])
        ready = [p for p in self._delayed if p.not_before <= now or p.job.job_id in stopped]
        if ready:
            going = {id(p) for p in ready}
            self._delayed = [p for p in self._delayed if id(p) not in going]
            for pending in ready:
                self.board.unschedule(pending.job.job_id)
                self._enqueue(pending)

    def _shutdown(self) -> None:
        """Warm shutdown: hand back what has not started, let the batch in flight finish, ack it; all within the grace."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        handed_back = self.batcher.drain() + self._delayed + list(self._fetching.values()) + self._unqueue_batch()
        self._delayed = []
        self._fetching.clear()
        for pending in handed_back:
            self._settle(pending.job.job_id, "requeue")
        log.info("shutting down: handed back %d queued jobs", len(handed_back))
        self._batches.put(None)
        self._model_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._writer_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._apply_outcomes()
        # A batch still running past the grace goes back now rather than after the heartbeat
        # timeout; if it stores its records before the process exits, the redelivery reads them.
        late = self.ledger.job_ids()
        if late:
            log.warning("%d jobs still running after %.0f s grace; handed back", len(late), self.settings.shutdown_grace_s)
        for job_id in late:
            self._settle(job_id, "requeue")
        self.ledger.retry_unsettled()
        self.heartbeat.stop()
        if self.ledger.unsettled:
            log.warning("%d messages could not be settled (broker away); they come back after the heartbeat timeout", self.ledger.unsettled)
        else:
            try:  # nothing should be left; whatever is (a rejected letter Redis did not take) goes back, and the heartbeat goes
                self.broker.retire()
            except redis.RedisError as exc:
                log.warning("could not retire from the broker (%s); what is left comes back after the heartbeat timeout", type(exc).__name__)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    def _unqueue_batch(self) -> list[Pending]:
        """Take back the batch queued behind the running one, if the model thread has not started it."""
        try:
            return self._batches.get_nowait() or []
        except queue.Empty:
            return []

    # -- the model thread -------------------------------------------------------------------

    def _model_loop(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                self._finishing.put(None)
                return
            # The last look, without I/O: revokes received since the hand-off (worker/cancels.py).
            self._stop(batch, self.cancels.local_reasons)
            self.board.activate(p.job.job_id for p in batch if p.prepared is not None and p.prepared.inputs is not None and p.prepared.error is None)
            try:
                finishing = self.runner.infer(batch)
            except Exception:  # noqa: BLE001 - a bug here must not kill the thread and strand jobs
                log.exception("batch of %d crashed; handing its jobs back", len(batch), extra=_ids(batch))
                self._inferred += 1
                self._outcomes.put([Outcome(pending, "requeue") for pending in batch])
                self._wake.set()
                del batch  # an idle worker keeps no finished batch's tensors alive
                continue
            self._inferred += 1
            self._wake.set()  # the model is free: the loop may hand it the next batch now
            self._finishing.put((batch, finishing))
            del batch, finishing

    def _writer_loop(self) -> None:
        while True:
            item = self._finishing.get()
            if item is None:
                return
            batch, finishing = item
            try:
                outcomes = self.runner.complete(finishing)
            except Exception:  # noqa: BLE001 - as above: never strand the batch's jobs
                log.exception("storing the records of a batch of %d crashed; handing its jobs back", len(batch), extra=_ids(batch))
                outcomes = [Outcome(pending, "requeue") for pending in batch]
            self._outcomes.put(outcomes)
            self._wake.set()
            del item, batch, finishing, outcomes  # as in _model_loop


def _ids(batch: list[Pending]) -> dict[str, list[str]]:
    """A log line's ``extra`` naming the batch's jobs (producer/logs.py)."""
    return {"job_ids": [pending.job.job_id for pending in batch]}
