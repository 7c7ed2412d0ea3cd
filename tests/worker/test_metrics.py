"""The metrics hook counts what the worker reports; the ledger's counters are read at scrape time."""

from __future__ import annotations

from datetime import timedelta

import torch
from prometheus_client import generate_latest

from producer.errors import UpstreamUnavailable
from producer.schema import ErrorInfo, GenerationSettings, Job, Record, utcnow
from worker.hooks import BatchReport
from worker.ledger import LedgerStats
from worker.metrics import WorkerMetrics, cuda_memory_reader


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


def _sample(text: str, name: str) -> float:
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


def test_stages_batch_shape_error_codes_and_restores_are_measured() -> None:
    ledger = LedgerStats()
    metrics = WorkerMetrics(worker="w1", ledger=ledger)
    job = _job("j1").model_copy(update={"submitted_at": utcnow() - timedelta(seconds=3)})
    metrics.on_received(job, {})
    stored = _record(job).model_copy(update={"fetch_ms": 20.0, "finished_at": utcnow() - timedelta(seconds=0.2)})
    metrics.on_stored(stored, job=job, created=True)
    metrics.on_stored(_record(job), job=job, created=False)  # found already stored: counted, not timed
    metrics.on_stored(_record(job, error="cancelled"), job=job, created=True)
    metrics.on_batch(BatchReport(size=4, generate_s=0.8, real_tokens=30, padded_tokens=40, executions=4, duplicate_executions=0,
                                 oom_splits=0, batch_id="w1-1", job_ids=("a", "b", "c", "d"), preprocess_s=(0.01, 0.02, 0.03, 0.04)))
    metrics.model_loaded(12.5)
    ledger.restored += 3
    text = generate_latest(metrics.registry).decode()
    assert 2.9 < _sample(text, 'vqa_queue_wait_seconds_sum{worker="w1"}') < 10
    assert _sample(text, 'vqa_fetch_seconds_sum{worker="w1"}') == 0.02 and _sample(text, 'vqa_fetch_seconds_count{worker="w1"}') == 1
    assert _sample(text, 'vqa_store_seconds_count{worker="w1"}') == 2 and _sample(text, 'vqa_store_seconds_sum{worker="w1"}') >= 0.2
    assert _sample(text, 'vqa_job_errors_total{code="cancelled",worker="w1"}') == 1
    assert _sample(text, 'vqa_jobs_total{status="succeeded",worker="w1"}') == 2  # the old names keep working
    assert _sample(text, 'vqa_preprocess_seconds_count{worker="w1"}') == 4
    assert abs(_sample(text, 'vqa_preprocess_seconds_sum{worker="w1"}') - 0.1) < 1e-9
    assert _sample(text, 'vqa_batch_inference_seconds_sum{worker="w1"}') == 0.8
    assert _sample(text, 'vqa_batch_size_bucket{le="4.0",worker="w1"}') == 1 and _sample(text, 'vqa_batch_size_bucket{le="2.0",worker="w1"}') == 0
    assert _sample(text, 'vqa_batch_padding_efficiency_sum{worker="w1"}') == 0.75
    assert _sample(text, 'vqa_prompt_tokens_total{worker="w1"}') == 30 and _sample(text, 'vqa_padded_prompt_tokens_total{worker="w1"}') == 40
    assert _sample(text, 'vqa_model_load_seconds{worker="w1"}') == 12.5
    assert _sample(text, 'vqa_messages_restored_total{worker="w1"}') == 3
    assert "vqa_gpu_memory" not in text


def test_gpu_memory_is_read_at_scrape_time_and_only_for_cuda() -> None:
    metrics = WorkerMetrics(worker="w1", ledger=LedgerStats())
    memory = {"allocated": 1024, "reserved": 4096}
    metrics.watch_gpu_memory(lambda: (memory["allocated"], memory["reserved"]))
    memory["allocated"] = 2048
    text = generate_latest(metrics.registry).decode()
    assert _sample(text, 'vqa_gpu_memory_allocated_bytes{worker="w1"}') == 2048
    assert _sample(text, 'vqa_gpu_memory_reserved_bytes{worker="w1"}') == 4096
    assert cuda_memory_reader("cpu") is None and cuda_memory_reader(torch.device("cpu")) is None
