"""Worker start-up: settings in, probes up, model loaded once and warmed up, parts and hooks wired, consumer running until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from producer.celery_app import make_celery
from producer.connections import redis_client
from producer.settings import Settings
from worker.batching import prefetch_batches
from worker.bulkruns import BulkRuns
from worker.cancels import CancelCheck, RevokedSet
from worker.consumer import BatchingConsumer
from worker.counters import JobCounters
from worker.cputime import CpuAccount
from worker.engine import Engine, ImageFirstEngine
from worker.fetch.images import FetchPolicy, install_pillow_warning_filter
from worker.health import Readiness
from worker.hooks import Hooks, WorkerInfo
from worker.imageshare import SharedImages
from worker.joblog import JobLog
from worker.preparing import JobPreparer
from worker.runner import BatchRunner
from worker.storage import RecordStore, make_s3_client
from worker.warmup import warm_up

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from worker.preprocess_pool import PreprocessPool

log = logging.getLogger(__name__)


def default_worker_name(settings: Settings) -> str:
    return settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"


def run_worker(settings: Settings, *, engine: Engine | None = None, s3_client: Any = None) -> None:
    """Load the model, then consume until a signal asks us to stop. Blocks.

    ``engine`` and ``s3_client`` replace the model and the S3 client made from the settings;
    only bench/scale.py passes them (a stand-in engine, to measure the queue at scale).
    """
    worker_name = default_worker_name(settings)
    stopping = threading.Event()
    readiness = Readiness()
    # Called after a stop is asked for: the consumer loop sleeps on its own event (worker/consumer.py).
    wakers: list[Callable[[], None]] = []

    def _on_signal(signum: int, _frame: Any) -> None:
        if stopping.is_set():
            log.warning("second %s: exiting now; unfinished jobs return via the broker", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: warm shutdown (grace %.0f s)", signal.Signals(signum).name, settings.shutdown_grace_s)
        readiness.advance("stopping")
        stopping.set()
        for wake in wakers:
            wake()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    install_pillow_warning_filter()
    # Up before the model loads: probes see "loading" rather than a refused connection.
    registry = _serve_endpoint(settings, readiness)

    started = time.perf_counter()
    if engine is None:
        # Heavy imports happen here, at start, never when the package is imported.
        from worker.model import VQAModel

        engine = VQAModel.load(settings)
    load_s = time.perf_counter() - started
    device = getattr(engine, "device", "cpu")
    log.info("loaded %s (%s) on %s in %.1f s", engine.name, engine.quantization, device, load_s)
    readiness.advance("warming", model_load_s=round(load_s, 3))
    warm_s = warm_up(engine, batch_size=settings.max_batch_size)
    log.info("warm-up batch of %d ran in %.2f s", settings.max_batch_size, warm_s)
    readiness.advance("warming", warmup_s=round(warm_s, 3))
    real_before, padded_before = _padding(engine)  # the warm-up's, left out of the last line

    app = make_celery(settings)
    s3 = s3_client if s3_client is not None else make_s3_client(settings)
    jobs_redis = redis_client(settings.broker_url, master_name=settings.sentinel_master_name)
    store = RecordStore(settings, s3_client=s3, app=app, marks=jobs_redis)
    counters = JobCounters(jobs_redis)
    cancels = CancelCheck(jobs_redis, revoked=RevokedSet(ttl_s=settings.revoke_ttl_s))
    # One fetch, decode and image preprocessing per image for the jobs in the worker at once, with
    # prefix sharing (off: every job fetches its own, as before). At most one entry per job held.
    held = prefetch_batches(settings.max_batch_tokens) * settings.max_batch_size + settings.fetch_concurrency
    images = SharedImages(max_entries=held) if settings.share_image_prefix else None
    # CPU in the model, decoding and preprocessing: the rest of the process's is the queue's own.
    cpu = CpuAccount()
    policy = _fetch_policy(settings, engine)
    pool = _preprocess_pool(settings, engine, policy)
    preparer = JobPreparer(
        engine=engine, store=store, counters=counters, cancels=cancels, policy=policy, s3_client=s3,
        images=images, cpu=cpu, image_grid=settings.image_grid, pool=pool,
    )
    # Bulk runs' counts and completion logs: on every worker (a no-op for jobs of no run).
    hooks = Hooks([JobLog(), BulkRuns(client=jobs_redis, s3_client=s3, settings=settings)])
    if settings.events_enabled:
        from worker.completions import CompletionEvents

        # Before the ack, a batch at once on the writer thread: a record's event is durable before its message goes (worker/completions.py).
        hooks.add(CompletionEvents(jobs_redis, settings=settings))
    runner = BatchRunner(
        settings=settings, engine=engine, store=store, counters=counters, worker_name=worker_name, stopping=stopping, hooks=hooks,
        cpu=cpu,
    )
    consumer = BatchingConsumer(
        settings=settings, runner=runner, prepare=preparer, stopping=stopping, hooks=hooks, cancels=cancels, worker_name=worker_name
    )
    readiness.watch(consumer.progress)
    wakers.append(consumer.stop)
    if registry is not None:
        from worker.metrics import WorkerMetrics, cuda_memory_reader

        metrics = WorkerMetrics(worker=worker_name, ledger=consumer.ledger.stats, registry=registry, cpu=cpu)
        metrics.model_loaded(load_s)
        gpu_memory = cuda_memory_reader(device)
        if gpu_memory is not None:
            metrics.watch_gpu_memory(gpu_memory)
        hooks.add(metrics)
    if settings.send_events:
        from worker.events import CeleryEvents

        # Heartbeats report the jobs this worker holds, received and not yet settled.
        hooks.add(CeleryEvents(app, hostname=worker_name, active=lambda: len(consumer.ledger)))
    if settings.remote_control:
        from worker.control import RemoteControl

        def _remote_shutdown() -> None:  # `celery control shutdown`: the warm shutdown SIGTERM starts
            readiness.advance("stopping")
            consumer.stop()

        hooks.add(
            RemoteControl(
                app, settings=settings, hostname=worker_name, board=consumer.board, cancels=cancels,
                redis_client=jobs_redis, shutdown=_remote_shutdown, prefetch=consumer.prefetch,
            )
        )

    hooks.on_worker_start(WorkerInfo(name=worker_name, queue=settings.queue))
    if not stopping.is_set():
        readiness.advance("ready")
    log.info("worker %s ready%s", worker_name, " (sending Celery events)" if settings.send_events else "")
    if settings.log_format == "text":  # in JSON, the log line above says it (stdout stays free of non-JSON lines)
        print(f"vqa worker {worker_name} ready", flush=True)  # tests and supervisors wait for this line
    try:
        consumer.run()
    finally:
        hooks.on_worker_stop()
        if pool is not None:
            pool.close()
    log.info("worker %s stopped: %d done, %d failed, %d batches", worker_name, runner.stats.jobs_done, runner.stats.jobs_failed, runner.stats.batches)
    # bench/ reads this line.
    real, padded = _padding(engine)
    log.info("padding: %d real / %d padded prompt tokens", real - real_before, padded - padded_before)


def _padding(engine: Engine) -> tuple[int, int]:
    """The Hugging Face engine's prompt-token counters (another engine may keep none)."""
    return getattr(engine, "real_tokens", 0), getattr(engine, "padded_tokens", 0)


def _fetch_policy(settings: Settings, engine: Engine) -> FetchPolicy:
    """The fetch caps, plus the engine's prescaler under VQA_IMAGE_PRESCALE (an engine without one decodes in full)."""
    prescaler = getattr(engine, "prescaler", None)
    return FetchPolicy.from_settings(settings, prescale=prescaler() if settings.image_prescale and prescaler else None)


def _preprocess_pool(settings: Settings, engine: Engine, policy: FetchPolicy) -> PreprocessPool | None:
    """VQA_PREPROCESS_PROCESSES: the processes that decode and prepare images, started now; None when 0."""
    if not settings.preprocess_processes:
        return None
    image_prep = getattr(engine, "image_prep", None)
    if image_prep is None or not isinstance(engine, ImageFirstEngine):
        log.warning("VQA_PREPROCESS_PROCESSES=%d ignored: engine %s prepares images on the fetch threads only",
                    settings.preprocess_processes, engine.name)
        return None
    from worker.preprocess_pool import PreprocessPool

    started = time.perf_counter()
    pool = PreprocessPool(image_prep(), policy, processes=settings.preprocess_processes)
    pool.warm()
    log.info("%d preprocessing processes started in %.1f s", settings.preprocess_processes, time.perf_counter() - started)
    return pool


def _serve_endpoint(settings: Settings, readiness: Readiness) -> CollectorRegistry | None:
    """/metrics, /healthz and /readyz on VQA_METRICS_PORT, when it is set; the registry the metrics hook fills."""
    if settings.metrics_port is None:
        return None
    from prometheus_client import CollectorRegistry

    from worker.metrics import serve_metrics

    registry = CollectorRegistry()
    timeout = settings.visibility_timeout
    serve_metrics(settings.metrics_port, registry=registry,
                  health=lambda: readiness.liveness(visibility_timeout=timeout),
                  ready=lambda: readiness.readiness(visibility_timeout=timeout))
    log.info("metrics on :%d/metrics, probes on /healthz and /readyz", settings.metrics_port)
    return registry
