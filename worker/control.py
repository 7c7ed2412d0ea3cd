"""Celery remote control, so ``celery inspect`` / ``celery control``, ``app.control`` and Flower reach our worker.

Our worker is not ``celery worker`` (worker/consumer.py says why), so it answers Celery's
broadcast commands itself, as a lifecycle hook (worker/hooks.py) with a thread and a broker
connection of its own: a node on kombu's ``pidbox`` mailbox (``app.control.mailbox``, what
``celery worker`` listens on; the wire format is kombu's), named like the worker's events. A
busy model never delays a reply: nothing here waits for the consumer or the model thread; the
jobs are read from the job board (worker/board.py), a thread-safe snapshot.

Commands, with the reply shapes ``celery worker`` gives:

    ping                     {"ok": "pong"}
    stats                    total, pid, clock, uptime, pool, broker, prefetch_count, rusage; and
                             "vqa" (model, batches, held jobs)
    active [safe]            jobs in the model (Celery's request info)
    reserved                 jobs held and not in the model: fetching, buffered, prefetched
    scheduled                jobs waiting for a retry: {"eta", "priority", "request"}
    revoked, query_task, registered, active_queues, clock, hello (another worker's mingle)
    conf [with_defaults]     the Celery configuration, censored as Celery does, and the worker's
                             VQA_* settings under "vqa" with secrets and URL passwords masked
    revoke / terminate       persisted in Redis with VQA_REVOKE_TTL_S (producer/revokes.py), so
                             it reaches every worker, and added to this worker's in-memory set;
                             a job already in the model finishes (the reply names it), and
                             terminate is answered as unsupported (the revoke still holds)
    shutdown                 warm shutdown, as SIGTERM
    add_consumer, cancel_consumer, pool/rate/time-limit commands and any other: an error reply
                             saying it is not supported

Between messages the thread also reads, about twice a second, the revoke markers of the jobs
this worker holds into the in-memory set (worker/cancels.py): a ``vqa cancel`` then reaches
the model thread's last look without any I/O on it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from celery.app.utils import HIDDEN_SETTINGS
from celery.utils.functional import maybe_list
from celery.utils.saferepr import saferepr
from celery.utils.serialization import jsonify, strtobool
from kombu.utils.encoding import safe_repr
from kombu.utils.url import maybe_sanitize_url

from producer.keys import TASK_NAME
from producer.revokes import read_revokes, write_revokes
from producer.settings import Settings
from worker.board import HeldJob, JobBoard
from worker.broker import reconnect_delay
from worker.cancels import CancelCheck
from worker.hooks import Hook, WorkerInfo
from worker.intake import printable

log = logging.getLogger(__name__)

SYNC_EVERY_S = 0.5  # how often the markers of held jobs are read into the in-memory revokes
_DRAIN_S = 0.5
_REPR_MAX = 1024
_MASK = "*" * 8
_TASK_ID_MAX = 255
_UNSUPPORTED_QUEUES = (
    "{command} is not supported: vqa worker consumes its one queue {queue!r} (VQA_QUEUE); "
    "run another worker with VQA_QUEUE set for another queue, or shut this one down to stop consuming"
)


def ok(value: Any) -> dict[str, Any]:
    return {"ok": value}


def nok(value: Any) -> dict[str, Any]:
    return {"error": value}


class _Commands(dict[str, Callable[..., Any]]):
    """The handlers kombu's Node dispatches to; a command we do not have gets a clear error reply, not silence."""

    def __missing__(self, name: str) -> Callable[..., Any]:
        def unsupported(_state: Any, **_arguments: Any) -> dict[str, Any]:
            return nok(f"{printable(name)} is not supported by vqa worker")

        return unsupported


class RemoteControl(Hook):
    """Answers Celery's remote-control broadcasts from a thread of its own, between ``on_worker_start`` and ``on_worker_stop``."""

    def __init__(
        self,
        app: Any,
        *,
        settings: Settings,
        hostname: str,
        board: JobBoard,
        cancels: CancelCheck,
        redis_client: redis.Redis,
        shutdown: Callable[[], None],
        prefetch: int,
        sync_every_s: float = SYNC_EVERY_S,
    ) -> None:
        self._app = app
        self._settings = settings
        self.hostname = hostname
        self._board = board
        self._cancels = cancels
        self._redis = redis_client
        self._stop_worker = shutdown
        self._prefetch = prefetch
        self._sync_every_s = sync_every_s
        self._pid = os.getpid()
        self._started = time.monotonic()
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._connection: Any = None  # only the control thread touches it
        self._next_sync = 0.0
        self.commands = self._commands()

    # -- hook points ------------------------------------------------------------------------

    def on_worker_start(self, worker: WorkerInfo, *, wait_s: float = 5.0) -> None:
        """Start listening; wait up to ``wait_s`` for it, so a worker that says "ready" answers ``ping`` at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vqa-control", daemon=True)
            self._thread.start()
            if not self._listening.wait(wait_s):
                log.warning("remote control: not listening yet after %.0f s (broker away?); it keeps trying", wait_s)

    def on_worker_stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * _DRAIN_S)

    # -- the control thread -----------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                self._listen()
                return
            except Exception as exc:  # noqa: BLE001 - a broker outage must not end remote control for good
                backoff = reconnect_delay(backoff)  # as the consumer does: back soon after a failover
                log.warning("remote control: %s: %s; listening again in %.1f s", type(exc).__name__, exc, backoff)
                self._stopping.wait(backoff)

    def _listen(self) -> None:
        node = self._app.control.mailbox.Node(self.hostname, state=self, handlers=self.commands)
        with self._app.connection_for_read() as connection:
            self._connection = connection
            node.channel = connection.channel()
            consumer = node.listen(callback=lambda body, message: self._on_message(node, body, message))
            try:
                while not self._stopping.is_set():
                    try:
                        connection.drain_events(timeout=_DRAIN_S)
                    except TimeoutError:
                        pass
                    if not self._listening.is_set():
                        # kombu subscribes to the broadcast channel in the first drain, not before.
                        log.info("remote control: listening as %s", self.hostname)
                        self._listening.set()
                    self._sync_revokes()
            finally:
                self._connection = None
                for closing in (consumer.cancel, node.channel.close):
                    try:
                        closing()
                    except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
                        pass

    def _on_message(self, node: Any, body: Any, message: Any) -> None:
        self._app.clock.forward()
        try:
            node.handle_message(body, message)
        except Exception:  # noqa: BLE001 - a malformed broadcast must not stop the thread
            log.exception("remote control: cannot handle a broadcast")

    def _sync_revokes(self) -> None:
        now = time.monotonic()
        if now < self._next_sync:
            return
        self._next_sync = now + self._sync_every_s
        held = self._board.held_ids()
        if not held:
            return
        try:
            found = read_revokes(self._redis, held)
        except redis.RedisError:
            return  # the fetch stage and the hand-off read them again
        if found:
            self._cancels.revoked.add(found)

    # -- commands ---------------------------------------------------------------------------

    def _commands(self) -> _Commands:
        commands = _Commands()
        for name in (
            "ping", "stats", "active", "reserved", "scheduled", "revoked", "query_task", "registered", "active_queues",
            "conf", "clock", "hello", "revoke", "terminate", "shutdown", "add_consumer", "cancel_consumer",
            "enable_events", "disable_events", "heartbeat",
        ):
            method = getattr(self, f"_{name}")
            commands[name] = lambda _state, _method=method, **arguments: _method(**arguments)
        commands["dump_active"], commands["dump_reserved"], commands["dump_schedule"] = (
            commands["active"], commands["reserved"], commands["scheduled"])
        commands["dump_revoked"], commands["dump_tasks"], commands["dump_conf"] = (
            commands["revoked"], commands["registered"], commands["conf"])
        return commands

    def _ping(self, **_: Any) -> dict[str, Any]:
        return ok("pong")

    def _stats(self, **_: Any) -> dict[str, Any]:
        held = self._board.snapshot()
        processed = self._board.processed
        return {
            "total": {TASK_NAME: processed} if processed else {},
            "pid": self._pid,
            "clock": str(self._app.clock),
            "uptime": round(time.monotonic() - self._started),
            "pool": {
                # The model runs micro-batches: up to this many jobs at once.
                "implementation": "worker.consumer:BatchingConsumer",
                "max-concurrency": self._settings.max_batch_size,
                "processes": [self._pid],
                "max-tasks-per-child": None,
                "put-guarded-by-semaphore": False,
                "timeouts": [],
            },
            "broker": self._broker_info(),
            "prefetch_count": self._prefetch,
            "rusage": _rusage(),
            "vqa": {
                "queue": self._settings.queue,
                "model": self._settings.model,
                "quantization": self._settings.quantization,
                "held": {state: sum(1 for job in held if job.state == state) for state in ("active", "reserved", "scheduled")},
                "revoked_in_memory": len(self._cancels.revoked),
            },
        }

    def _broker_info(self) -> Any:
        if self._connection is None:
            return "N/A"
        info = dict(self._connection.info())
        info.pop("password", None)  # as celery worker does
        alternates = info.get("alternates")
        if isinstance(alternates, list | tuple):
            info["alternates"] = [maybe_sanitize_url(url) if isinstance(url, str) else url for url in alternates]
        return info

    def _active(self, safe: Any = False, **_: Any) -> list[dict[str, Any]]:
        return [self._info(job, safe=bool(safe)) for job in self._board.snapshot() if job.state == "active"]

    def _reserved(self, **_: Any) -> list[dict[str, Any]]:
        return [self._info(job) for job in self._board.snapshot() if job.state == "reserved"]

    def _scheduled(self, **_: Any) -> list[dict[str, Any]]:
        return [
            {"eta": _iso(job.eta), "priority": job.properties.get("priority"), "request": self._info(job)}
            for job in self._board.snapshot()
            if job.state == "scheduled"
        ]

    def _revoked(self, **_: Any) -> list[str]:
        return self._cancels.revoked.ids()

    def _query_task(self, ids: Any = None, **_: Any) -> dict[str, Any]:
        wanted = {str(task_id) for task_id in maybe_list(ids) or []}
        return {job.job.job_id: [job.state, self._info(job)] for job in self._board.snapshot() if job.job.job_id in wanted}

    def _registered(self, **_: Any) -> list[str]:
        return [TASK_NAME]

    def _active_queues(self, **_: Any) -> list[dict[str, Any]]:
        return [dict(self._app.amqp.queues[self._settings.queue].as_dict(recurse=True))]

    def _conf(self, with_defaults: Any = False, **_: Any) -> dict[str, Any]:
        if isinstance(with_defaults, str):
            with_defaults = strtobool(with_defaults)
        table = jsonify(
            self._app.conf.table(with_defaults=bool(with_defaults)),
            keyfilter=lambda key: isinstance(key, str) and not key.startswith("__"),
            unknown_type_filter=safe_repr,
        )
        table["vqa"] = masked_settings(self._settings)
        return table

    def _clock(self, **_: Any) -> dict[str, Any]:
        return {"clock": self._app.clock.value}

    def _hello(self, from_node: Any = None, revoked: Any = None, **_: Any) -> dict[str, Any] | None:
        """A starting ``celery worker`` syncs its revokes (mingle): take theirs into memory, give ours."""
        if from_node == self.hostname:
            return None
        if isinstance(revoked, list | tuple):
            self._cancels.revoked.add(str(task_id)[:_TASK_ID_MAX] for task_id in revoked)
        return {"revoked": self._cancels.revoked.ids(), "clock": self._app.clock.forward()}

    def _revoke(self, task_id: Any = None, terminate: Any = False, signal: Any = None, **_: Any) -> dict[str, Any]:
        ids = {str(one)[:_TASK_ID_MAX] for one in maybe_list(task_id) or [] if one is not None}
        if not ids:
            return nok("no task id given")
        persisted: Exception | None = None
        try:
            write_revokes(self._redis, ids, ttl_s=self._settings.revoke_ttl_s, by=f"celery revoke via {self.hostname}")
        except redis.RedisError as exc:
            persisted = exc
        self._cancels.revoked.add(ids)
        running = sorted(job.job.job_id for job in self._board.snapshot() if job.state == "active" and job.job.job_id in ids)
        message = f"tasks {ids} flagged as revoked"
        if running:
            message += f"; already in the model, these finish: {', '.join(running)}"
        log.info("tasks flagged as revoked (remote control): %s", printable(", ".join(sorted(ids)), 500))
        if terminate:
            return nok(f"terminate is not supported: a job in the model runs to its end; {message}")
        if persisted is not None:
            return nok(f"{message} in this worker only: cannot persist the revoke in Redis ({type(persisted).__name__})")
        return ok(message)

    def _terminate(self, signal: Any = None, task_id: Any = None, **_: Any) -> dict[str, Any]:
        return self._revoke(task_id=task_id, terminate=True, signal=signal)

    def _shutdown(self, msg: Any = "Got shutdown from remote", **_: Any) -> dict[str, Any]:
        log.warning("%s: warm shutdown", printable(msg, 200))
        self._stop_worker()
        return ok("warm shutdown: jobs not yet in the model go back to the queue, the batch in the model finishes")

    def _add_consumer(self, queue: Any = None, **_: Any) -> dict[str, Any]:
        return nok(_UNSUPPORTED_QUEUES.format(command="add_consumer", queue=self._settings.queue))

    def _cancel_consumer(self, queue: Any = None, **_: Any) -> dict[str, Any]:
        return nok(_UNSUPPORTED_QUEUES.format(command="cancel_consumer", queue=self._settings.queue))

    def _enable_events(self, **_: Any) -> dict[str, Any]:
        if self._settings.send_events:
            return ok("task events already enabled")
        return nok("task events are off in this worker and cannot be turned on remotely: start it with VQA_SEND_EVENTS=true")

    def _disable_events(self, **_: Any) -> dict[str, Any]:
        return nok("task events cannot be turned off remotely: start the worker with VQA_SEND_EVENTS=false")

    def _heartbeat(self, **_: Any) -> None:
        return None  # worker/events.py sends heartbeats every 2 s on its own

    # -- replies ----------------------------------------------------------------------------

    def _info(self, held: HeldJob, *, safe: bool = False) -> dict[str, Any]:
        """Celery's ``Request.info()`` for a held job."""
        job = held.job
        kwargs = {"job": job.model_dump(mode="json", exclude={"webhook_url"})}  # a webhook URL may carry a token
        properties = held.properties
        delivery = properties.get("delivery_info")
        delivery = delivery if isinstance(delivery, dict) else {}
        return {
            "id": job.job_id,
            "name": TASK_NAME,
            "args": "()" if safe else [],
            "kwargs": saferepr(kwargs, maxlen=_REPR_MAX) if safe else kwargs,
            "type": TASK_NAME,
            "hostname": self.hostname,
            "time_start": held.time_start,
            "acknowledged": False,  # acked only once the record is stored
            "delivery_info": {
                "exchange": printable(delivery.get("exchange", "")),
                "routing_key": printable(delivery.get("routing_key", self._settings.queue)),
                "priority": properties.get("priority") if isinstance(properties.get("priority"), int) else None,
                "redelivered": None,
            },
            "worker_pid": self._pid if held.state == "active" else None,
        }


def masked_settings(settings: Settings) -> dict[str, Any]:
    """The worker's settings as ``VQA_*`` names, for ``conf``: secrets masked as Celery masks them, URLs without passwords."""
    masked: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None and HIDDEN_SETTINGS.search(name):
            value = _MASK
        elif isinstance(value, str) and "://" in value:
            value = maybe_sanitize_url(value, mask=_MASK)
        masked[f"VQA_{name.upper()}"] = value
    return masked


def _iso(when: float | None) -> str | None:
    return None if when is None else datetime.fromtimestamp(when, tz=UTC).isoformat()


def _rusage() -> dict[str, Any] | str:
    try:
        import resource
    except ImportError:  # not on this platform
        return "N/A"
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {field: getattr(usage, f"ru_{field}") for field in _RUSAGE_FIELDS}


_RUSAGE_FIELDS = (
    "utime", "stime", "maxrss", "ixrss", "idrss", "isrss", "minflt", "majflt",
    "nswap", "inblock", "oublock", "msgsnd", "msgrcv", "nsignals", "nvcsw", "nivcsw",
)
