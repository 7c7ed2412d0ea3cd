"""Celery events on a real redis-server, read back with Celery's own ``EventReceiver`` and ``State`` (what Flower uses)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from producer.celery_app import make_celery
from producer.client import VQAClient
from producer.keys import TASK_NAME
from producer.schema import ErrorInfo, GenerationSettings, Job, Record, utcnow
from producer.settings import Settings
from worker import events as events_module
from worker.dev.services import RedisServer, WorkerProcess, free_port
from producer.errors import UpstreamUnavailable
from worker.events import CeleryEvents
from worker.hooks import WorkerInfo
from tests.support.images import SIZES

TASK_TYPES = ("task-received", "task-started", "task-succeeded", "task-failed", "task-retried")


def _job(job_id: str) -> Job:
    return Job(
        job_id=job_id,
        image_url="https://images.example/a.png",
        question=f"What is in {job_id}?",
        model="m",
        generation=GenerationSettings(max_new_tokens=4),
        submitted_at=utcnow(),
    )


WORKER = WorkerInfo(name="w", queue="vqa")


def _succeeded_record(job: Job, *, answer: str, infer_ms: float) -> Record:
    return Record(
        job_id=job.job_id, status="succeeded", image_url=job.image_url, question=job.question, answer=answer, model=job.model,
        quantization="none", generation=job.generation, attempts=1, worker="w", batch_size=1,
        submitted_at=job.submitted_at, started_at=None, finished_at=utcnow(), infer_ms=infer_ms,
    )


def _failed_record(job: Job, code: str, message: str) -> Record:
    return Record(
        job_id=job.job_id, status="failed", image_url=job.image_url, question=job.question, answer=None, model=job.model,
        quantization="none", generation=job.generation, attempts=1, worker="w", batch_size=1,
        submitted_at=job.submitted_at, started_at=None, finished_at=utcnow(),
        error=ErrorInfo(code=code, message=message, retryable=False),
    )


def _app(broker_url: str) -> Celery:
    return make_celery(Settings(broker_url=broker_url, result_backend=broker_url))


def _wait_for(condition: Callable[[], bool], what: str, *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


_PROBE_HOST = "events-probe"


@contextmanager
def captured_events(app: Celery) -> Iterator[list[dict[str, Any]]]:
    """Every event published while inside, as Celery's EventReceiver hands them to a monitor."""
    seen: list[dict[str, Any]] = []
    listening = threading.Event()

    def handle(event: dict[str, Any]) -> None:
        if event.get("hostname") == _PROBE_HOST:
            listening.set()
        else:
            seen.append(event)

    with app.connection_for_read() as connection, app.connection_for_write() as probe_connection:
        receiver = app.events.Receiver(connection, handlers={"*": handle})
        # wakeup=False: no 'heartbeat' broadcast to workers; ours answer no control commands.
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        try:
            # Events travel by Redis PUBLISH: whatever is sent before the receiver subscribes is
            # lost. Counting subscriptions is not proof (another test's subscriber on the same
            # server counts too): probe events are sent until this receiver hands one back.
            probe = app.events.Dispatcher(probe_connection, hostname=_PROBE_HOST, enabled=True)

            def heard_probe() -> bool:
                probe.send("worker-probe")
                return listening.wait(0.1)

            _wait_for(heard_probe, "the receiver to subscribe")
            probe.close()
            yield seen
        finally:
            receiver.should_stop = True
            thread.join(timeout=10)


def _of_type(seen: list[dict[str, Any]], *types: str) -> list[dict[str, Any]]:
    return [event for event in list(seen) if event["type"] in types]


# --------------------------------------------------------------------------- worker/events.py


@pytest.mark.timeout(60)
def test_sends_the_events_celery_worker_sends(redis_url: str) -> None:
    app = _app(redis_url)
    good, bad = _job("job-good"), _job("job-bad")
    with captured_events(app) as seen:
        events = CeleryEvents(app, hostname="w-events", heartbeat_s=0.2, active=lambda: 3)
        events.on_worker_start(WORKER)
        # parent_id is not task-id-shaped: monitors get None rather than what a forged header says.
        events.on_received(good, {"root_id": "root-1", "parent_id": "../../x y", "retries": 2})
        events.on_received(bad, {})
        events.on_started([good, bad])
        events.on_retried(bad, UpstreamUnavailable("refused", code="connection_failed"), 1.0)
        events.on_started([bad])
        events.on_stored(_succeeded_record(good, answer="a red box", infer_ms=250.0), job=good, created=True)
        events.on_stored(_failed_record(bad, "model_error", "boom"), job=bad, created=True)
        _wait_for(lambda: len(_of_type(seen, "worker-heartbeat")) >= 2, "two heartbeats")
        events.on_worker_stop()
        _wait_for(lambda: bool(_of_type(seen, "worker-offline")), "worker-offline")

    assert {event["hostname"] for event in seen} == {"w-events"}
    tasks = [(event["type"], event["uuid"]) for event in _of_type(seen, *TASK_TYPES)]
    assert tasks == [
        ("task-received", good.job_id),
        ("task-received", bad.job_id),
        ("task-started", good.job_id),
        ("task-started", bad.job_id),
        ("task-retried", bad.job_id),
        ("task-started", bad.job_id),
        ("task-succeeded", good.job_id),
        ("task-failed", bad.job_id),
    ]
    received = _of_type(seen, "task-received")
    assert received[0]["name"] == TASK_NAME and received[0]["args"] == "()"
    assert good.question in received[0]["kwargs"] and len(received[0]["kwargs"]) <= 256
    assert (received[0]["root_id"], received[0]["parent_id"], received[0]["retries"]) == ("root-1", None, 2)
    assert (received[1]["root_id"], received[1]["parent_id"], received[1]["retries"]) == (bad.job_id, None, 0)
    [succeeded] = _of_type(seen, "task-succeeded")
    assert succeeded["runtime"] == 0.25 and "a red box" in succeeded["result"]
    [failed] = _of_type(seen, "task-failed")
    assert failed["exception"] == "model_error: boom"

    kinds = [event["type"] for event in _of_type(seen, "worker-online", "worker-heartbeat", "worker-offline")]
    assert kinds[0] == "worker-online" and kinds[-1] == "worker-offline"
    offline = _of_type(seen, "worker-offline")[-1]
    assert (offline["freq"], offline["active"], offline["processed"]) == (0.2, 3, 2)
    assert offline["sw_ident"] == "py-celery" and len(offline["loadavg"]) == 3

    # Celery's own state machine (Flower's) makes sense of them.
    state = app.events.State()
    for event in seen:
        state.event(event)
    assert state.tasks[good.job_id].state == "SUCCESS" and state.tasks[good.job_id].name == TASK_NAME
    assert state.tasks[bad.job_id].state == "FAILURE"
    assert state.tasks[good.job_id].worker.hostname == "w-events"
    assert not state.workers["w-events"].alive


@pytest.mark.timeout(30)
def test_unreachable_broker_never_raises_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    app = _app(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    events = CeleryEvents(app, hostname="w-dead", heartbeat_s=0.05, active=lambda: 1)
    job = _job("job-1")
    begun = time.monotonic()
    with caplog.at_level(logging.INFO, logger="worker.events"):
        events.on_worker_start(WORKER)
        for _ in range(3):
            events.on_received(job, {})
            events.on_started([job])
            events.on_retried(job, UpstreamUnavailable("x"), 0.5)
            events.on_stored(_failed_record(job, "timeout", "x"), job=job, created=True)
        time.sleep(0.2)  # a few heartbeats fail too
        events.on_worker_stop()
    assert time.monotonic() - begun < 5, "a dead broker must not hold up the job path"
    warnings = [record for record in caplog.records if record.name == "worker.events" and record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot send Celery events" in warnings[0].getMessage()


@pytest.mark.timeout(60)
def test_events_resume_after_a_redis_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(events_module, "_RETRY_AFTER_S", 0.2)
    # A server of its own: killing the session's Redis would end other tests' leftover client
    # threads mid-read, and their sockets would close unclosed during this test.
    server = RedisServer(data_dir=tmp_path).start()
    app = _app(server.url)
    events = CeleryEvents(app, hostname="w-restart", heartbeat_s=60)
    try:
        with caplog.at_level(logging.INFO, logger="worker.events"):
            events.on_worker_start(WORKER)  # connects: worker-online
            _wait_for(lambda: events._dispatcher is not None, "the first event to go out")
            server.stop(kill=True)
            events.on_started([_job("while-down")])  # fails on the open connection; logged
            _wait_for(lambda: events._failing, "the failure to be noticed")
            server.start()
            time.sleep(0.3)
            with captured_events(app) as seen:
                _wait_for(lambda: bool(events.on_started([_job("after")]) or _of_type(seen, "task-started")), "an event after the restart")
            events.on_worker_stop()
    finally:
        server.stop(kill=True)
    assert "after" in {event["uuid"] for event in _of_type(seen, "task-started")}
    messages = [record.getMessage() for record in caplog.records if record.name == "worker.events"]
    assert any("cannot send" in message for message in messages) and "sending Celery events again" in messages
