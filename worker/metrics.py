"""The worker's HTTP endpoint (``VQA_METRICS_PORT``): Prometheus metrics and ``/healthz``.

``/metrics`` (any path but ``/healthz``) serves the worker's own counters, read at scrape time.
``/healthz`` answers 200 or 503 with a JSON report (worker/health.py): for a liveness probe.

The counters live in plain dataclasses (``BatchStats``, ``LedgerStats``) that the model and
consumer threads update; this collector only reads them, so the hot path never touches
prometheus_client and tests can read the same numbers without an HTTP server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.ledger import LedgerStats
from worker.runner import BatchStats


class WorkerCollector(Collector):
    """Exposes one worker's :class:`BatchStats` and :class:`LedgerStats`."""

    def __init__(self, *, worker: str, batches: BatchStats, ledger: LedgerStats) -> None:
        self.worker = worker
        self.batches = batches
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        b, led = self.batches, self.ledger
        yield self._counter("vqa_jobs", "Jobs finished with a stored record, by status.", [("succeeded", b.jobs_done), ("failed", b.jobs_failed)])
        yield self._counter("vqa_executions", "Model runs per job (a job running twice counts twice).", [(None, b.executions)])
        yield self._counter(
            "vqa_duplicate_executions", "Model runs of a job that had run before (redelivery or retry).", [(None, b.duplicate_executions)]
        )
        yield self._counter("vqa_batches", "Batched generate calls.", [(None, b.batches)])
        yield self._counter("vqa_oom_splits", "Batches split in halves after running out of memory.", [(None, b.oom_splits)])
        yield self._counter("vqa_retries", "Transient failures given another attempt.", [(None, b.retries)])
        yield self._counter("vqa_poison", "Jobs quarantined after too many deliveries.", [(None, b.poisoned)])
        yield self._counter("vqa_messages_acked", "Messages acknowledged after their record was stored.", [(None, led.acked)])
        yield self._counter("vqa_messages_requeued", "Messages handed back to the queue.", [(None, led.requeued)])
        yield self._counter(
            "vqa_duplicate_deliveries", "Deliveries of a job this worker already held.", [(None, led.duplicate_deliveries)]
        )
        hold = GaugeMetricFamily("vqa_max_hold_seconds", "Longest a message stayed unacknowledged here.", labels=["worker"])
        hold.add_metric([self.worker], led.max_hold_s)
        yield hold
        slowest = GaugeMetricFamily("vqa_slowest_batch_seconds", "Longest generate call so far.", labels=["worker"])
        slowest.add_metric([self.worker], b.slowest_batch_s)
        yield slowest

    def _counter(self, name: str, doc: str, values: list[tuple[str | None, float]]) -> CounterMetricFamily:
        labels = ["worker", "status"] if values[0][0] is not None else ["worker"]
        family = CounterMetricFamily(name, doc, labels=labels)
        for status, value in values:
            family.add_metric([self.worker] if status is None else [self.worker, status], value)
        return family


Health = Callable[[], tuple[bool, dict[str, Any]]]


def serve_metrics(port: int, *, worker: str, batches: BatchStats, ledger: LedgerStats, health: Health | None = None) -> WSGIServer:
    """Start the HTTP endpoint on ``port`` (all interfaces) in a daemon thread; returns the server."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker=worker, batches=batches, ledger=ledger))
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
