"""Celery task and worker events, as ``celery worker -E`` sends them, so Flower and ``celery events`` see our worker.

Our worker is not ``celery worker`` (worker/consumer.py says why), so it reports itself: the
events go through Celery's own ``EventDispatcher`` on a connection of their own, with the same
types and fields Celery's worker sends:

    worker-online, worker-heartbeat (every 2 s), worker-offline
        freq, active (jobs held), processed (jobs finished), loadavg, sw_ident/sw_ver/sw_sys
    task-received    uuid, name, args, kwargs (a short repr), root_id, parent_id, retries, eta, expires
    task-started     uuid
    task-succeeded   uuid, result (a short repr of the answer), runtime (seconds in the model, or None)
    task-failed      uuid, exception ("code: message"), traceback (None)
    task-retried     uuid, exception (the transient error), traceback (None)

Events are best effort, as in Celery: one that cannot be sent is dropped and never raises into
the job path. While the broker is away, events are dropped for a few seconds at a time instead
of each one waiting for a connection, and the outage is logged once.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery.utils.saferepr import saferepr
from celery.utils.sysinfo import load_average
from celery.worker.state import SOFTWARE_INFO

from producer.keys import TASK_NAME
from producer.schema import Job, Record

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # Celery's default; Flower marks a worker offline after missing a few
_RETRY_AFTER_S = 5.0  # after a failed send, events are dropped this long before reconnecting
_REPR_MAX = 256
# One try per connect and short socket timeouts: an event must not hold up a job for long.
_TRANSPORT = {"max_retries": 0, "socket_connect_timeout": 2, "socket_timeout": 5}
# root_id and parent_id come from the message headers, which anyone who can write to the
# broker controls: only task-id-shaped values are passed on to monitors.
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class TaskEvents:
    """Sends Celery events for one worker; every method is thread-safe and never raises.

    Built with ``app=None`` (:meth:`off`) it sends nothing and costs a method call.
    """

    def __init__(self, app: Any, *, hostname: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self._app = app  # a celery.Celery, or None when events are off
        self.hostname = hostname
        self._heartbeat_s = heartbeat_s
        # kombu producers are not thread-safe; the consumer, model, status, store and
        # heartbeat threads all send.
        self._lock = threading.Lock()
        self._connection: Any = None
        self._dispatcher: Any = None
        self._retry_at = 0.0
        self._failing = False
        self._closed = False
        self._processed = 0
        self._active: Callable[[], int] = lambda: 0
        self._stop_beating = threading.Event()
        self._beat_thread: threading.Thread | None = None

    @classmethod
    def off(cls) -> TaskEvents:
        """The no-op instance: what consumers and runners use unless given real events."""
        return cls(None, hostname="")

    @property
    def enabled(self) -> bool:
        return self._app is not None

    # -- worker events ----------------------------------------------------------------------

    def start(self, *, active: Callable[[], int] | None = None) -> None:
        """Send worker-online, then worker-heartbeat every ``heartbeat_s`` from a daemon thread.

        ``active`` counts the jobs the worker holds, for the heartbeats.
        """
        if not self.enabled or self._beat_thread is not None:
            return
        if active is not None:
            self._active = active
        self._send_worker("worker-online")
        self._beat_thread = threading.Thread(target=self._beat, name="vqa-events", daemon=True)
        self._beat_thread.start()

    def stop(self) -> None:
        """Stop the heartbeats, send worker-offline, close the connection; later events are dropped."""
        if not self.enabled:
            return
        self._stop_beating.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=2 * self._heartbeat_s)
        self._send_worker("worker-offline")
        with self._lock:
            self._closed = True
            self._disconnect()

    def _beat(self) -> None:
        while not self._stop_beating.wait(self._heartbeat_s):
            self._send_worker("worker-heartbeat")

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

    # -- task events ------------------------------------------------------------------------

    def received(self, job: Job, *, headers: Mapping[str, Any] | None = None) -> None:
        """task-received for a job the worker just accepted; ``headers`` are its message's Celery headers."""
        if not self.enabled:
            return
        headers = headers or {}
        retries = headers.get("retries")
        self._send(
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

    def started(self, job_ids: list[str]) -> None:
        """task-started for each job of a group about to run in the model."""
        for job_id in job_ids if self.enabled else ():
            self._send("task-started", uuid=job_id)

    def stored(self, record: Record) -> None:
        """task-succeeded or task-failed for a job whose record was just stored."""
        if record.status == "succeeded":
            runtime = None if record.infer_ms is None else record.infer_ms / 1000
            self.succeeded(record.job_id, runtime=runtime, result=record.answer)
        else:
            error = record.error
            self.failed(record.job_id, exception="failed" if error is None else f"{error.code}: {error.message}")

    def succeeded(self, job_id: str, *, runtime: float | None, result: str | None) -> None:
        """task-succeeded once the job's record is stored; ``runtime`` in seconds."""
        if not self.enabled:
            return
        self._count_processed()
        self._send("task-succeeded", uuid=job_id, result=saferepr(result, maxlen=_REPR_MAX), runtime=runtime)

    def failed(self, job_id: str, *, exception: str) -> None:
        """task-failed once the job's failure record is stored."""
        if not self.enabled:
            return
        self._count_processed()
        self._send("task-failed", uuid=job_id, exception=exception[:_REPR_MAX], traceback=None)

    def retried(self, job_id: str, *, reason: str) -> None:
        """task-retried when a transient failure gets the job another attempt."""
        if self.enabled:
            self._send("task-retried", uuid=job_id, exception=reason[:_REPR_MAX], traceback=None)

    def _count_processed(self) -> None:
        with self._lock:
            self._processed += 1

    # -- sending ----------------------------------------------------------------------------

    def _send(self, event_type: str, **fields: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if self._closed or now < self._retry_at:
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
