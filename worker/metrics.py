"""The worker's metrics, as a lifecycle hook, and its HTTP endpoint (``VQA_METRICS_PORT``): ``/metrics``, ``/healthz``, ``/readyz``.

:class:`WorkerMetrics` is a hook (worker/hooks.py): it counts jobs, retries, batches and
executions and times each stage of a job as the worker reports them, off the model thread,
into prometheus-client metrics. The ledger's own counters (acks, hand-backs, restores, holds)
and the GPU's memory are read at scrape time. Every name is listed in docs/operations.md.

``/metrics`` (any path but the two probes) serves them; ``/healthz`` (liveness) and ``/readyz``
(readiness) answer 200 or 503 with a JSON report (worker/health.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.errors import VQAError
from producer.schema import Job, Record
from worker.cputime import CpuAccount
from worker.hooks import BatchReport, Hook
from worker.jobs import seconds_since
from worker.ledger import LedgerStats


class WorkerMetrics(Hook):
    """Prometheus metrics of one worker, fed by the lifecycle hooks; ``registry`` is what /metrics serves."""

    def __init__(self, *, worker: str, ledger: LedgerStats, registry: CollectorRegistry | None = None,
                 cpu: CpuAccount | None = None) -> None:
        self.worker = worker
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Counter("vqa_jobs", "Jobs finished with a stored record, by status.", ["worker", "status"], registry=r)
        self.executions = Counter("vqa_executions", "Model runs per job (a job running twice counts twice).", ["worker"], registry=r)
        self.duplicate_executions = Counter(
            "vqa_duplicate_executions", "Model runs of a job that had run before (redelivery or retry).", ["worker"], registry=r
        )
        self.batches = Counter("vqa_batches", "Batched generate calls.", ["worker"], registry=r)
        self.oom_splits = Counter("vqa_oom_splits", "Batches split in halves after running out of memory.", ["worker"], registry=r)
        self.retries = Counter("vqa_retries", "Transient failures given another attempt.", ["worker"], registry=r)
        self.poison = Counter("vqa_poison", "Jobs quarantined after too many deliveries.", ["worker"], registry=r)
        self.rejected = Counter("vqa_messages_rejected", "Queue entries refused at intake and dead-lettered.", ["worker"], registry=r)
        self.slowest_batch = Gauge("vqa_slowest_batch_seconds", "Longest generate call so far.", ["worker"], registry=r)
        # Every series exists from the start, at 0: a rate() over a fresh worker is defined.
        for status in ("succeeded", "failed"):
            self.jobs.labels(worker, status)
        for metric in (self.executions, self.duplicate_executions, self.batches, self.oom_splits, self.retries, self.poison, self.rejected):
            metric.labels(worker)
        self.slowest_batch.labels(worker)
        self._slowest_s = 0.0
        # Issue 13: outcomes by error code, each stage's time, batch shape, model load.
        self.job_errors = Counter("vqa_job_errors", "Failed records by error code (cancelled and expired included).",
                                  ["worker", "code"], registry=r)
        self.queue_wait = Histogram("vqa_queue_wait_seconds", "From submit to taken off the queue, per delivery.", ["worker"],
                                    buckets=_WAIT_BUCKETS, registry=r)
        self.fetch = Histogram("vqa_fetch_seconds", "Image download and decode, per job.", ["worker"], buckets=_STAGE_BUCKETS, registry=r)
        self.preprocess = Histogram("vqa_preprocess_seconds", "Preprocessing (tiles, prompt) per job, on the fetch pool.", ["worker"],
                                    buckets=_STAGE_BUCKETS, registry=r)
        self.inference = Histogram("vqa_batch_inference_seconds", "Generate time per model batch.", ["worker"],
                                   buckets=_INFER_BUCKETS, registry=r)
        self.store = Histogram("vqa_store_seconds", "From the answer to its record stored in S3 and the result backend.", ["worker"],
                               buckets=_STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("vqa_batch_size", "Jobs per model batch.", ["worker"], buckets=_SIZE_BUCKETS, registry=r)
        self.padding_efficiency = Histogram("vqa_batch_padding_efficiency", "Real prompt tokens / tokens computed with padding, per batch.",
                                            ["worker"], buckets=_RATIO_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vqa_prompt_tokens", "Real prompt tokens of the jobs run (image tokens included).", ["worker"], registry=r)
        self.padded_tokens = Counter("vqa_padded_prompt_tokens", "Prompt tokens computed, padding included.", ["worker"], registry=r)
        self.model_load = Gauge("vqa_model_load_seconds", "How long loading the model took at start-up.", ["worker"], registry=r)
        for metric in (self.queue_wait, self.fetch, self.preprocess, self.inference, self.store, self.batch_size,
                       self.padding_efficiency, self.prompt_tokens, self.padded_tokens, self.model_load):
            metric.labels(worker)
        r.register(LedgerCollector(worker=worker, ledger=ledger))
        if cpu is not None:
            r.register(CpuCollector(worker=worker, cpu=cpu))

    def model_loaded(self, seconds: float) -> None:
        self.model_load.labels(self.worker).set(seconds)

    def watch_gpu_memory(self, read: MemoryReader) -> None:
        """Serve the GPU's allocated/reserved bytes, read at scrape time (only where CUDA is present)."""
        self.registry.register(GpuMemoryCollector(worker=self.worker, read=read))

    def on_received(self, job: Job, headers: Mapping[str, Any]) -> None:
        self.queue_wait.labels(self.worker).observe(seconds_since(job.submitted_at))

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        self.jobs.labels(self.worker, record.status).inc()
        if record.error is not None:
            self.job_errors.labels(self.worker, record.error.code).inc()
            if record.error.code == "poison":
                self.poison.labels(self.worker).inc()
        if created:  # a record found already stored was timed by the worker that made it
            if record.fetch_ms is not None:
                self.fetch.labels(self.worker).observe(record.fetch_ms / 1000)
            self.store.labels(self.worker).observe(seconds_since(record.finished_at))

    def on_retried(self, job: Job, error: VQAError, delay_s: float) -> None:
        self.retries.labels(self.worker).inc()

    def on_rejected(self, tag: str, reason: str) -> None:
        self.rejected.labels(self.worker).inc()

    def on_batch(self, report: BatchReport) -> None:
        self.batches.labels(self.worker).inc()
        self.executions.labels(self.worker).inc(report.executions)
        self.duplicate_executions.labels(self.worker).inc(report.duplicate_executions)
        self.oom_splits.labels(self.worker).inc(report.oom_splits)
        if report.generate_s > self._slowest_s:  # on_batch runs on the writer thread only
            self._slowest_s = report.generate_s
            self.slowest_batch.labels(self.worker).set(report.generate_s)
        self.inference.labels(self.worker).observe(report.generate_s)
        self.batch_size.labels(self.worker).observe(report.size)
        if report.padded_tokens:
            self.padding_efficiency.labels(self.worker).observe(report.real_tokens / report.padded_tokens)
        self.prompt_tokens.labels(self.worker).inc(report.real_tokens)
        self.padded_tokens.labels(self.worker).inc(report.padded_tokens)
        for seconds in report.preprocess_s:
            self.preprocess.labels(self.worker).observe(seconds)


_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_INFER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

MemoryReader = Callable[[], tuple[int, int]]


def cuda_memory_reader(device: Any) -> MemoryReader | None:
    """(allocated, reserved) bytes of ``device`` from torch's caching allocator; None where it is no CUDA device."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda":
        return None
    import torch  # only on a worker that already has it loaded

    def read() -> tuple[int, int]:
        return torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)

    return read


class GpuMemoryCollector(Collector):
    """GPU memory the model's process holds, read at scrape time: what torch allocated and what its allocator reserved."""

    def __init__(self, *, worker: str, read: MemoryReader) -> None:
        self.worker = worker
        self.read = read

    def collect(self) -> Iterator[Metric]:
        allocated, reserved = self.read()
        for name, doc, value in (
            ("vqa_gpu_memory_allocated_bytes", "GPU memory held by tensors (torch.cuda.memory_allocated).", allocated),
            ("vqa_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator (torch.cuda.memory_reserved).", reserved),
        ):
            family = GaugeMetricFamily(name, doc, labels=["worker"])
            family.add_metric([self.worker], value)
            yield family


class CpuCollector(Collector):
    """The worker's CPU seconds in the model, decoding and preprocessing (worker/cputime.py), read at scrape time."""

    _HELP = {
        "model": "CPU seconds on the model thread inside the engine's batched call.",
        "decode": "CPU seconds decoding images, on the fetch pool.",
        "preprocess": "CPU seconds preprocessing images and prompts for the model, on the fetch pool.",
    }

    def __init__(self, *, worker: str, cpu: CpuAccount) -> None:
        self.worker = worker
        self.cpu = cpu

    def collect(self) -> Iterator[Metric]:
        for stage, seconds in self.cpu.seconds().items():
            family = CounterMetricFamily(f"vqa_{stage}_cpu_seconds", self._HELP[stage], labels=["worker"])
            family.add_metric([self.worker], seconds)
            yield family


class LedgerCollector(Collector):
    """The consumer's :class:`LedgerStats`, read at scrape time (the consumer thread updates them)."""

    def __init__(self, *, worker: str, ledger: LedgerStats) -> None:
        self.worker = worker
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        led = self.ledger
        yield self._counter("vqa_messages_acked", "Messages acknowledged after their record was stored.", led.acked)
        yield self._counter("vqa_messages_requeued", "Messages handed back to the queue.", led.requeued)
        yield self._counter("vqa_duplicate_deliveries", "Deliveries of a job this worker already held.", led.duplicate_deliveries)
        yield self._counter("vqa_settles_refused", "Acks and hand-backs refused: the delivery had been restored to another worker.", led.refused_settles)
        yield self._counter("vqa_messages_restored", "Messages this worker's restore step put back on the queue.", led.restored)
        hold = GaugeMetricFamily("vqa_max_hold_seconds", "Longest a message stayed unacknowledged here.", labels=["worker"])
        hold.add_metric([self.worker], led.max_hold_s)
        yield hold

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["worker"])
        family.add_metric([self.worker], value)
        return family


Health = Callable[[], tuple[bool, dict[str, Any]]]


def serve_metrics(port: int, *, registry: CollectorRegistry, health: Health | None = None, ready: Health | None = None) -> WSGIServer:
    """Start the HTTP endpoint on ``port`` (all interfaces) in a daemon thread; returns the server."""
    app = endpoint_app(make_wsgi_app(registry), health, ready)
    server = make_server("", port, app, _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="vqa-metrics", daemon=True).start()
    return server


def endpoint_app(metrics_app: Any, health: Health | None, ready: Health | None = None) -> Any:
    """The WSGI app: ``/healthz`` from ``health``, ``/readyz`` from ``ready``, everything else from prometheus_client."""
    probes = {path: probe for path, probe in (("/healthz", health), ("/readyz", ready)) if probe is not None}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        probe = probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        healthy, report = probe()
        body = json.dumps(report).encode()
        start_response("200 OK" if healthy else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the worker's exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        """Probes every few seconds would flood the worker's log."""
