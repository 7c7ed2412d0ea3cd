"""Worker start-up: settings in, model loaded once, parts and hooks wired, consumer running until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from producer.celery_app import make_celery
from producer.connections import redis_client
from producer.settings import Settings
from worker.cancels import CancelCheck
from worker.consumer import BatchingConsumer
from worker.counters import JobCounters
from worker.fetch.images import FetchPolicy, install_pillow_warning_filter
from worker.hooks import Hook, Hooks, WorkerInfo
from worker.preparing import JobPreparer
from worker.runner import BatchRunner
from worker.storage import RecordStore, make_s3_client

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    """Load the model, then consume until a signal asks us to stop. Blocks."""
    worker_name = settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        if stopping.is_set():
            log.warning("second %s: exiting now; unfinished jobs return via the broker", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: warm shutdown (grace %.0f s)", signal.Signals(signum).name, settings.shutdown_grace_s)
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    install_pillow_warning_filter()

    # Heavy imports happen here, at start, never when the package is imported.
    from worker.model import VQAModel

    started = time.perf_counter()
    engine = VQAModel.load(settings)
    log.info("loaded %s (%s) on %s in %.1f s", engine.name, settings.quantization, engine.device, time.perf_counter() - started)

    app = make_celery(settings)
    s3 = make_s3_client(settings)
    store = RecordStore(settings, s3_client=s3, app=app)
    jobs_redis = redis_client(settings.broker_url)
    counters = JobCounters(jobs_redis)
    cancels = CancelCheck(jobs_redis)
    preparer = JobPreparer(
        engine=engine, store=store, counters=counters, cancels=cancels, policy=FetchPolicy.from_settings(settings), s3_client=s3
    )
    hooks = Hooks()
    runner = BatchRunner(
        settings=settings, engine=engine, store=store, counters=counters, worker_name=worker_name, stopping=stopping, hooks=hooks
    )
    consumer = BatchingConsumer(settings=settings, runner=runner, prepare=preparer, stopping=stopping, hooks=hooks, cancels=cancels)
    for hook in _optional_hooks(settings, app=app, worker_name=worker_name, consumer=consumer):
        hooks.add(hook)

    hooks.on_worker_start(WorkerInfo(name=worker_name, queue=settings.queue))
    log.info("worker %s ready%s", worker_name, " (sending Celery events)" if settings.send_events else "")
    print(f"vqa worker {worker_name} ready", flush=True)  # tests and supervisors wait for this line
    try:
        consumer.run()
    finally:
        hooks.on_worker_stop()
    log.info("worker %s stopped: %d done, %d failed, %d batches", worker_name, runner.stats.jobs_done, runner.stats.jobs_failed, runner.stats.batches)
    # bench/ reads this line.
    log.info("padding: %d real / %d padded prompt tokens", engine.real_tokens, engine.padded_tokens)


def _optional_hooks(settings: Settings, *, app: Any, worker_name: str, consumer: BatchingConsumer) -> list[Hook]:
    """The hooks the settings turn on: Prometheus metrics (with /healthz), Celery events."""
    hooks: list[Hook] = []
    if settings.metrics_port is not None:
        from worker import health
        from worker.metrics import WorkerMetrics, serve_metrics

        metrics = WorkerMetrics(worker=worker_name, ledger=consumer.ledger.stats)

        def check() -> tuple[bool, dict[str, Any]]:
            return health.check(consumer.progress(), visibility_timeout=settings.visibility_timeout)

        serve_metrics(settings.metrics_port, registry=metrics.registry, health=check)
        log.info("metrics on :%d/metrics, health on :%d/healthz", settings.metrics_port, settings.metrics_port)
        hooks.append(metrics)
    if settings.send_events:
        from worker.events import CeleryEvents

        # Heartbeats report the jobs this worker holds, received and not yet settled.
        hooks.append(CeleryEvents(app, hostname=worker_name, active=lambda: len(consumer.ledger)))
    return hooks
