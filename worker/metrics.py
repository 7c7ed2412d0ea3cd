"""The worker's metrics, as a lifecycle hook, and its HTTP endpoint (``VQA_METRICS_PORT``): ``/metrics`` and ``/healthz``.

:class:`WorkerMetrics` is a hook (worker/hooks.py): it counts jobs, retries, batches and
executions as the worker reports them, off the model thread, into prometheus-client metrics.
The ledger's own counters (acks, hand-backs, holds) are read at scrape time.

``/metrics`` (any path but ``/healthz``) serves them; ``/healthz`` answers 200 or 503 with a
JSON report (worker/health.py): for a liveness probe.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from producer.errors import VQAError
from producer.schema import Job, Record
from worker.hooks import BatchReport, Hook
from worker.ledger import LedgerStats


class WorkerMetrics(Hook):
    """Prometheus metrics of one worker, fed by the lifecycle hooks; ``registry`` is what /metrics serves."""

    def __init__(self, *, worker: str, ledger: LedgerStats, registry: CollectorRegistry | None = None) -> None:
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
        r.register(LedgerCollector(worker=worker, ledger=ledger))

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        self.jobs.labels(self.worker, record.status).inc()
        if record.error is not None and record.error.code == "poison":
            self.poison.labels(self.worker).inc()

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
        hold = GaugeMetricFamily("vqa_max_hold_seconds", "Longest a message stayed unacknowledged here.", labels=["worker"])
        hold.add_metric([self.worker], led.max_hold_s)
        yield hold

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["worker"])
        family.add_metric([self.worker], value)
        return family


Health = Callable[[], tuple[bool, dict[str, Any]]]


def serve_metrics(port: int, *, registry: CollectorRegistry, health: Health | None = None) -> WSGIServer:
    """Start the HTTP endpoint on ``port`` (all interfaces) in a daemon thread; returns the server."""
    app = endpoint_app(make_wsgi_app(registry), health)
    server = make_server("", port, app, _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="vqa-metrics", daemon=True).start()
    return server


def endpoint_app(metrics_app: Any, health: Health | None) -> Any:
    """The WSGI app: ``/healthz`` from ``health``, everything else from prometheus_client."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz" or health is None:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        healthy, report = health()
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
