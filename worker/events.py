"""Celery task and worker events, as ``celery worker -E`` sends them, so Flower and ``celery events`` see our worker.

Our worker is not ``celery worker`` (worker/consumer.py says why), so it reports itself, as a
lifecycle hook (worker/hooks.py): the events go through Celery's own ``EventDispatcher`` on a
connection of their own, from a thread of their own, with the same types and fields Celery's
worker sends:

    worker-online, worker-heartbeat (every 2 s), worker-offline
        freq, active (jobs held), processed (jobs finished), loadavg, sw_ident/sw_ver/sw_sys
    task-received    uuid, name, args, kwargs (a short repr), root_id, parent_id, retries, eta, expires
    task-started     uuid
    task-succeeded   uuid, result (a short repr of the answer), runtime (seconds in the model, or None)
    task-failed      uuid, exception ("code: message"), traceback (None)
    task-retried     uuid, exception (the transient error), traceback (None)
    task-revoked     uuid, terminated (False), signum (None), expired: a cancelled or expired job

Events are best effort, as in Celery: one that cannot be sent is dropped and never raises into
the job path. While the broker is away, events are dropped for a few seconds at a time instead
of each one waiting for a connection, and the outage is logged once.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from celery.utils.saferepr import saferepr
from celery.utils.sysinfo import load_average
from celery.worker.state import SOFTWARE_INFO

from producer.errors import STOPPED_CODES, VQAError
from producer.keys import TASK_NAME
from producer.schema import Job, Record
from worker.hooks import Hook, WorkerInfo

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # Celery's default; Flower marks a worker offline after missing a few
_RETRY_AFTER_S = 5.0  # after a failed send, events are dropped this long before reconnecting
_REPR_MAX = 256
# One try per connect and short socket timeouts: an event must not hold up a job for long.
_TRANSPORT = {"max_retries": 0, "socket_connect_timeout": 2, "socket_timeout": 5}
# root_id and parent_id come from the message headers, which anyone who can write to the
# broker controls: only task-id-shaped values are passed on to monitors.
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class CeleryEvents(Hook):
    """The worker's Celery events, as a lifecycle hook; every point only queues the event.

    One sender thread of its own sends them in order (and the heartbeats between them), so no
    worker thread ever waits for the broker or for a lock because of an event. When the queue
    is full (the broker is slow or away), new events are dropped and counted.
    """

    def __init__(
        self,
        app: Any,
        *,
        hostname: str,
        heartbeat_s: float = HEARTBEAT_S,
        active: Callable[[], int] = lambda: 0,
        max_queued: int = 10_000,
    ) -> None:
        self._app = app
        self.hostname = hostname
        self._heartbeat_s = heartbeat_s
        self._active = active  # jobs the worker holds, for the heartbeats
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None
        self.dropped = 0  # events not sent because the queue was full
        # Only the sender thread touches these.
        self._connection: Any = None
        self._dispatcher: Any = None
        self._retry_at = 0.0
        self._failing = False
        self._processed = 0

    # -- hook points (any thread) -----------------------------------------------------------

    def on_worker_start(self, worker: WorkerInfo) -> None:
        """worker-online now, then worker-heartbeat every ``heartbeat_s`` until on_worker_stop."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vqa-events", daemon=True)
            self._thread.start()

    def on_worker_stop(self) -> None:
        """Send what is queued, then worker-offline; close the connection."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=max(10.0, 2 * self._heartbeat_s))

    def on_received(self, job: Job, headers: Mapping[str, Any]) -> None:
        retries = headers.get("retries")
        self.send(
            "task-received",
            uuid=job.job_id,
            name=TASK_NAME,
            args="()",
            kwargs=saferepr({"job": {"image_url": job.image_url, "question": job.question}}, maxlen=_REPR_MAX),
            root_id=_task_id(headers.get("root_id")) or job.job_id,
            parent_id=_task_id(headers.get("parent_id")),
            retries=retries if type(retries) is int and retries >= 0 else 0,
            eta=None,
            expires=None,
        )

    def on_started(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.send("task-started", uuid=job.job_id)

    def on_retried(self, job: Job, error: VQAError, delay_s: float) -> None:
        self.send("task-retried", uuid=job.job_id, exception=f"{error.code}: {error.message}"[:_REPR_MAX], traceback=None)

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        """task-succeeded or task-failed once the job's record is stored."""
        if record.status == "succeeded":
            runtime = None if record.infer_ms is None else record.infer_ms / 1000
            self.send("task-succeeded", uuid=record.job_id, result=saferepr(record.answer, maxlen=_REPR_MAX), runtime=runtime)
        elif record.error is not None and record.error.code in STOPPED_CODES:
            # What Celery's worker sends for a revoked task; Flower shows it as REVOKED.
            self.send("task-revoked", uuid=record.job_id, terminated=False, signum=None, expired=record.error.code == "expired")
        else:
            error = record.error
            exception = "failed" if error is None else f"{error.code}: {error.message}"
            self.send("task-failed", uuid=record.job_id, exception=exception[:_REPR_MAX], traceback=None)

    def send(self, event_type: str, **fields: Any) -> None:
        """Queue any Celery event for the sender thread; never blocks, never raises."""
        try:
            self._queue.put_nowait((event_type, fields))
        except queue.Full:
            self.dropped += 1

    # -- the sender thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._send_worker("worker-online")
        next_beat = time.monotonic() + self._heartbeat_s
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                item = ("", {})
            if item is None:
                break
            event_type, fields = item
            if event_type:
                if event_type in ("task-succeeded", "task-failed"):
                    self._processed += 1
                self._send(event_type, **fields)
            if time.monotonic() >= next_beat:
                self._send_worker("worker-heartbeat")
                next_beat = time.monotonic() + self._heartbeat_s
        self._send_worker("worker-offline")
        self._disconnect()

    def _send_worker(self, event_type: str) -> None:
        try:
            active = self._active()
        except Exception:  # noqa: BLE001 - a heartbeat must not die on a counting glitch
            active = 0
        self._send(
            event_type,
            freq=self._heartbeat_s,
            active=active,
            processed=self._processed,
            loadavg=load_average(),
            **SOFTWARE_INFO,
        )

    # -- sending ----------------------------------------------------------------------------

    def _send(self, event_type: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            return
        try:
            if self._dispatcher is None:
                self._connect()
            self._dispatcher.send(event_type, **fields)
        except Exception as exc:  # noqa: BLE001 - events are best effort; a job must never fail on one
            self._retry_at = now + _RETRY_AFTER_S
            self._disconnect()
            if not self._failing:
                self._failing = True
                log.warning("cannot send Celery events (%s: %s); dropping them until the broker answers", type(exc).__name__, exc)
            return
        if self._failing:
            self._failing = False
            log.info("sending Celery events again")

    def _connect(self) -> None:
        # A connection of its own: the consumer's Redis client is not kombu's, and the
        # dispatcher must not share a channel with anything else.
        self._connection = self._app.connection_for_write(transport_options=_TRANSPORT)
        # No buffering while offline: Celery's buffer only empties on an explicit flush and
        # would grow for as long as the broker is away.
        self._dispatcher = self._app.events.Dispatcher(
            self._connection, hostname=self.hostname, enabled=True, buffer_while_offline=False
        )

    def _disconnect(self) -> None:
        dispatcher, connection = self._dispatcher, self._connection
        self._dispatcher = self._connection = None
        for closing in (dispatcher, connection):
            if closing is None:
                continue
            try:
                closing.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
                pass


def _task_id(value: object) -> str | None:
    return value if isinstance(value, str) and _TASK_ID.match(value) else None
