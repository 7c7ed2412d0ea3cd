"""The Prometheus collector reads the worker's counters at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from worker.ledger import LedgerStats
from worker.metrics import WorkerCollector
from worker.runner import BatchStats


def test_counters_are_exposed_with_the_worker_label() -> None:
    batches = BatchStats(jobs_done=7, jobs_failed=1, executions=9, duplicate_executions=2, oom_splits=1, batches=3)
    ledger = LedgerStats(acked=8, requeued=1, duplicate_deliveries=1, max_hold_s=2.5)
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker="w1", batches=batches, ledger=ledger))
    text = generate_latest(registry).decode()
    assert 'vqa_jobs_total{status="succeeded",worker="w1"} 7.0' in text  # labels come sorted
    assert 'vqa_duplicate_executions_total{worker="w1"} 2.0' in text
    assert 'vqa_oom_splits_total{worker="w1"} 1.0' in text
    assert 'vqa_max_hold_seconds{worker="w1"} 2.5' in text
    batches.jobs_done += 1  # read live, no re-registration
    assert "8.0" in generate_latest(registry).decode()
