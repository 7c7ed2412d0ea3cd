"""Worker start-up: settings in, model loaded once, consumer running until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import redis

from producer.celery_app import make_celery
from producer.errors import StorageUnavailable
from producer.schema import Job
from producer.settings import Settings
from worker.consumer import BatchingConsumer
from worker.events import TaskEvents
from worker.fetch.images import FetchPolicy, fetch_image
from worker.runner import BatchRunner, Prepared
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

    # Heavy imports happen here, at start, never when the package is imported.
    from worker.model import VQAModel

    started = time.perf_counter()
    model = VQAModel.load(settings)
    log.info("loaded %s (%s) on %s in %.1f s", model.name, settings.quantization, model.device, time.perf_counter() - started)

    app = make_celery(settings)
    s3 = make_s3_client(settings)
    store = RecordStore(settings, s3_client=s3, app=app)
    counters = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)
    policy = FetchPolicy.from_settings(settings)

    def prepare(job: Job) -> Prepared:
        try:
            existing = store.existing(job.job_id)
        except StorageUnavailable as exc:
            # The lookup is a shortcut: an S3 outage must not use up the job's attempts. The
            # conditional create still keeps the first record; storing waits for S3 to return.
            log.warning("job %s: cannot check for an existing record (%s); running it", job.job_id, exc)
            existing = None
        if existing is not None:
            return Prepared(existing=existing)
        start = time.perf_counter()
        image = fetch_image(job.image_url, policy, s3_client=s3)
        fetch_ms = (time.perf_counter() - start) * 1000
        # Preprocess here on the fetch pool, so the model thread only pads, stacks and runs.
        inputs = model.prepare(image, job.question)
        return Prepared(inputs=inputs, cost=inputs.num_tokens, fetch_ms=fetch_ms)

    events = TaskEvents(app, hostname=worker_name) if settings.send_events else TaskEvents.off()
    runner = BatchRunner(
        settings=settings, model=model, store=store, counters=counters, worker_name=worker_name, stopping=stopping, events=events
    )
    consumer = BatchingConsumer(settings=settings, runner=runner, prepare=prepare, stopping=stopping, events=events)
    if settings.metrics_port is not None:
        from worker.metrics import serve_metrics

        from worker import health

        def check() -> tuple[bool, dict[str, Any]]:
            return health.check(consumer.progress(), visibility_timeout=settings.visibility_timeout)

        serve_metrics(settings.metrics_port, worker=worker_name, batches=runner.stats, ledger=consumer.ledger.stats, health=check)
        log.info("metrics on :%d/metrics, health on :%d/healthz", settings.metrics_port, settings.metrics_port)
    # Heartbeats report the jobs this worker holds, received and not yet settled.
    events.start(active=lambda: len(consumer.ledger))
    log.info("worker %s ready%s", worker_name, " (sending Celery events)" if events.enabled else "")
    print(f"vqa worker {worker_name} ready", flush=True)  # tests and supervisors wait for this line
    try:
        consumer.run()
    finally:
        events.stop()
    log.info("worker %s stopped: %d done, %d failed, %d batches", worker_name, runner.stats.jobs_done, runner.stats.jobs_failed, runner.stats.batches)
    # bench/ reads this line.
    log.info("padding: %d real / %d padded prompt tokens", model.real_tokens, model.padded_tokens)
