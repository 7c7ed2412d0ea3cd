"""The batching consumer: Celery messages in from Redis, micro-batches out to the model thread, acks back.

Why our own consumer instead of celery-batches: a message must be acknowledged only after
its record is stored, retried per job, handed back on shutdown, and counted for poison
detection — celery-batches acks a failed batch under acks_late, has no per-request retry,
and keeps buffered messages on shutdown. This loop speaks Celery's task protocol (v2, JSON)
on the same queue, so producers use plain Celery and ``AsyncResult`` works.

Threads: the consumer thread owns the broker connection and every message (receive, ack,
requeue); a fetch pool downloads and decodes images as messages arrive, overlapping the
model; one model thread runs batches. They talk through queues only.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kombu import Connection, Consumer, Queue

from producer import keys
from producer.errors import InvalidJob, PermanentError, VQAError
from producer.schema import Job
from producer.settings import Settings
from worker.batching import MicroBatcher
from worker.runner import BatchRunner, Outcome, Pending, Prepared

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.2
_RECONNECT_MAX_S = 10.0


class BatchingConsumer:
    """Consumes ``settings.queue`` and runs jobs in micro-batches until :meth:`stop` is called."""

    def __init__(
        self,
        *,
        settings: Settings,
        runner: BatchRunner,
        prepare: Any,
        stopping: threading.Event,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self._prepare = prepare  # Callable[[Job], Prepared], runs on the fetch pool
        self.stopping = stopping
        self.batcher: MicroBatcher[Pending] = MicroBatcher(
            max_size=settings.max_batch_size, max_delay_s=settings.max_batch_delay_ms / 1000
        )
        # One batch in the model, one filling up behind it.
        self.prefetch = 2 * settings.max_batch_size
        self._fetch_pool = ThreadPoolExecutor(max_workers=settings.fetch_concurrency, thread_name_prefix="vqa-fetch")
        self._batches: queue.Queue[list[Pending] | None] = queue.Queue(maxsize=1)
        self._outcomes: queue.Queue[list[Outcome]] = queue.Queue()
        self._model_busy = threading.Event()
        self._delayed: list[Pending] = []  # transient failures waiting for their retry time
        self._held: set[int] = set()  # id() of every Pending whose message is still unacked
        self._model_thread = threading.Thread(target=self._model_loop, name="vqa-model", daemon=True)
        self._connection_errors = (OSError, *Connection(settings.broker_url).connection_errors)

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped; then hand back what was not started and finish what was."""
        self._model_thread.start()
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                with Connection(self.settings.broker_url, transport_options=self._transport_options()) as conn:
                    conn.ensure_connection(max_retries=1)
                    self._consume(conn)
                    backoff = 0.5
                    if self.stopping.is_set():
                        self._shutdown(conn)
                        return
            except self._connection_errors as exc:
                if self.stopping.is_set():
                    break
                log.warning("broker connection lost (%s); reconnecting in %.1f s", type(exc).__name__, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, _RECONNECT_MAX_S)
        self._finish_without_broker()

    def stop(self) -> None:
        self.stopping.set()

    def _transport_options(self) -> dict[str, Any]:
        return {"visibility_timeout": self.settings.visibility_timeout, "socket_timeout": 30, "socket_connect_timeout": 5}

    # -- the consumer thread ----------------------------------------------------------------

    def _consume(self, conn: Connection) -> None:
        channel = conn.channel()
        consumer = Consumer(
            channel,
            queues=[Queue(self.settings.queue, routing_key=self.settings.queue)],
            on_message=self._on_message,
            accept=["json"],
            on_decode_error=self._on_decode_error,
            prefetch_count=self.prefetch,
        )
        with consumer:
            log.info("consuming %r (batch %d, delay %d ms, prefetch %d)", self.settings.queue,
                     self.settings.max_batch_size, self.settings.max_batch_delay_ms, self.prefetch)
            while not self.stopping.is_set():
                try:
                    conn.drain_events(timeout=self._poll_timeout())
                except socket.timeout:
                    pass
                self._tick()

    def _tick(self) -> None:
        self._apply_outcomes()
        self._release_delayed()
        if not self._model_busy.is_set() and self._batches.empty():
            batch = self.batcher.take()
            if batch:
                self._model_busy.set()
                self._batches.put(batch)

    def _poll_timeout(self) -> float:
        due = self.batcher.next_due_in()
        timeout = _IDLE_POLL_S if due is None else min(_IDLE_POLL_S, max(due, 0.005))
        if self._model_busy.is_set() or not self._outcomes.empty():
            timeout = min(timeout, 0.05)
        return timeout

    def _on_message(self, message: Any) -> None:
        try:
            job = decode_task_message(message)
        except InvalidJob as exc:
            log.error("rejected message %s: %s", message.headers.get("id", "?") if message.headers else "?", exc)
            message.reject()
            return
        pending = Pending(job=job, message=message, received_at=time.monotonic())
        self._held.add(id(pending))
        self._enqueue(pending)

    def _on_decode_error(self, message: Any, exc: Exception) -> None:
        # Pickle and other content types never reach the model; drop them with a reason.
        log.error("rejected undecodable message (content type %r): %s", message.content_type, exc)
        message.reject()

    def _enqueue(self, pending: Pending) -> None:
        pending.prepared = self._fetch_pool.submit(self._safe_prepare, pending.job)
        self.batcher.add(pending.job.generation, pending)

    def _safe_prepare(self, job: Job) -> Prepared:
        try:
            return self._prepare(job)
        except VQAError as exc:
            return Prepared(error=exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must not escape into the loop
            log.exception("unexpected error preparing job %s", job.job_id)
            return Prepared(error=PermanentError(f"could not prepare the job: {type(exc).__name__}", code="internal_error"))

    def _apply_outcomes(self) -> None:
        while True:
            try:
                outcomes = self._outcomes.get_nowait()
            except queue.Empty:
                return
            for outcome in outcomes:
                pending = outcome.pending
                if outcome.action == "retry":
                    pending.attempt += 1
                    pending.not_before = time.monotonic() + outcome.delay_s
                    self._delayed.append(pending)
                    continue
                self._held.discard(id(pending))
                try:
                    if outcome.action == "ack":
                        pending.message.ack()
                    else:
                        pending.message.requeue()
                except Exception as exc:  # noqa: BLE001 - broker gone: visibility timeout redelivers it
                    log.warning("could not %s job %s (%s); it will be redelivered", outcome.action, pending.job.job_id, exc)

    def _release_delayed(self) -> None:
        now = time.monotonic()
        ready = [p for p in self._delayed if p.not_before <= now]
        if ready:
            self._delayed = [p for p in self._delayed if p.not_before > now]
            for pending in ready:
                self._enqueue(pending)

    def _shutdown(self, conn: Connection) -> None:
        """Warm shutdown: hand back what has not started, let the batch in flight finish, ack it."""
        handed_back = self.batcher.drain() + self._delayed
        self._delayed = []
        for pending in handed_back:
            self._held.discard(id(pending))
            try:
                pending.message.requeue()
            except Exception as exc:  # noqa: BLE001
                log.warning("could not hand back job %s: %s", pending.job.job_id, exc)
        log.info("shutting down: handed back %d queued jobs", len(handed_back))
        self._batches.put(None)
        self._model_thread.join(timeout=self.settings.shutdown_grace_s)
        if self._model_thread.is_alive():
            log.warning("batch still running after %.0f s grace; its jobs go back via the broker", self.settings.shutdown_grace_s)
        self._apply_outcomes()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    def _finish_without_broker(self) -> None:
        self._batches.put(None)
        self._model_thread.join(timeout=self.settings.shutdown_grace_s)
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)

    # -- the model thread -------------------------------------------------------------------

    def _model_loop(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                return
            try:
                outcomes = self.runner.run(batch)
            except Exception:  # noqa: BLE001 - a bug here must not kill the thread and strand jobs
                log.exception("batch of %d crashed; handing its jobs back", len(batch))
                outcomes = [Outcome(pending, "requeue") for pending in batch]
            self._outcomes.put(outcomes)
            self._model_busy.clear()


def decode_task_message(message: Any) -> Job:
    """Validate a Celery protocol-2 message for our task and return its job; raise InvalidJob otherwise."""
    headers = message.headers or {}
    task = headers.get("task")
    if task != keys.TASK_NAME:
        raise InvalidJob(f"not a {keys.TASK_NAME} message (task={str(task)[:80]!r})")
    try:
        body = message.decode()
    except Exception as exc:  # noqa: BLE001 - kombu raises many types for bad content
        raise InvalidJob(f"cannot decode the message body: {type(exc).__name__}") from exc
    if not (isinstance(body, list | tuple) and len(body) == 3 and isinstance(body[1], dict)):
        raise InvalidJob("body is not Celery protocol 2 [args, kwargs, embed]")
    args, kwargs, _ = body
    if args or set(kwargs) != {"job"}:
        raise InvalidJob("expected exactly one keyword argument 'job'")
    job = Job.decode(kwargs["job"])
    if headers.get("id") != job.job_id:
        raise InvalidJob("message id does not match the job id")
    return job
