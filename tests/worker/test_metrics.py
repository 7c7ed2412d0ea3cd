"""The metrics hook counts what the worker reports; the ledger's counters are read at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest

from producer.errors import UpstreamUnavailable
from producer.schema import ErrorInfo, GenerationSettings, Job, Record, utcnow
from worker.hooks import BatchReport
from worker.ledger import LedgerStats
from worker.metrics import WorkerMetrics


def _job(job_id: str) -> Job:
    return Job(job_id=job_id, image_url="https://images.example/a.png", question="What?", model="m",
               generation=GenerationSettings(max_new_tokens=4), submitted_at=utcnow())


def _record(job: Job, *, error: str | None = None) -> Record:
    return Record(
        job_id=job.job_id, status="failed" if error else "succeeded", image_url=job.image_url, question=job.question,
        answer=None if error else "a cat", model="m", quantization="none", generation=job.generation, attempts=1,
        worker="w1", batch_size=1, submitted_at=job.submitted_at, started_at=None, finished_at=utcnow(),
        error=ErrorInfo(code=error, message="x", retryable=False) if error else None,
    )


def test_hook_points_become_counters_with_the_worker_label() -> None:
    ledger = LedgerStats(acked=8, requeued=1, duplicate_deliveries=1, max_hold_s=2.5)
    metrics = WorkerMetrics(worker="w1", ledger=ledger)
    text = generate_latest(metrics.registry).decode()
    assert 'vqa_jobs_total{status="succeeded",worker="w1"} 0.0' in text  # every series exists from the start
    job = _job("j1")
    for _ in range(7):
        metrics.on_stored(_record(job), job=job, created=True)
    metrics.on_stored(_record(job, error="poison"), job=job, created=True)
    metrics.on_retried(job, UpstreamUnavailable("reset"), 1.0)
    metrics.on_rejected("tag", "not JSON")
    metrics.on_batch(BatchReport(size=4, generate_s=1.5, real_tokens=10, padded_tokens=12, executions=4, duplicate_executions=2, oom_splits=1))
    metrics.on_batch(BatchReport(size=1, generate_s=0.5, real_tokens=3, padded_tokens=3, executions=1, duplicate_executions=0, oom_splits=0))
    text = generate_latest(metrics.registry).decode()
    assert 'vqa_jobs_total{status="succeeded",worker="w1"} 7.0' in text  # labels come sorted
    assert 'vqa_jobs_total{status="failed",worker="w1"} 1.0' in text
    assert 'vqa_poison_total{worker="w1"} 1.0' in text and 'vqa_retries_total{worker="w1"} 1.0' in text
    assert 'vqa_messages_rejected_total{worker="w1"} 1.0' in text
    assert 'vqa_batches_total{worker="w1"} 2.0' in text and 'vqa_executions_total{worker="w1"} 5.0' in text
    assert 'vqa_duplicate_executions_total{worker="w1"} 2.0' in text
    assert 'vqa_oom_splits_total{worker="w1"} 1.0' in text
    assert 'vqa_slowest_batch_seconds{worker="w1"} 1.5' in text
    assert 'vqa_max_hold_seconds{worker="w1"} 2.5' in text and 'vqa_messages_acked_total{worker="w1"} 8.0' in text
    ledger.acked += 1  # read live, no re-registration
    assert 'vqa_messages_acked_total{worker="w1"} 9.0' in generate_latest(metrics.registry).decode()
