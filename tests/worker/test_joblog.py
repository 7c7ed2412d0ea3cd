"""The job log hook: one line per step of a job, with its id, and its batch's id once it ran."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from producer.errors import UpstreamUnavailable
from producer.schema import utcnow
from worker.hooks import BatchReport
from worker.joblog import JobLog
from tests.worker.test_metrics import _job, _record


def test_each_step_is_a_line_with_the_job_and_its_batch(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vqa.jobs")
    hook = JobLog()
    ran, skipped = _job("ran"), _job("skipped")
    hook.on_received(ran.model_copy(update={"submitted_at": utcnow() - timedelta(seconds=2)}), {})
    error = UpstreamUnavailable("reset")
    hook.on_retried(ran, error, 0.5)
    hook.on_batch(BatchReport(size=1, generate_s=0.1, real_tokens=5, padded_tokens=5, executions=1, duplicate_executions=0,
                              oom_splits=0, batch_id="w1-3", job_ids=("ran",)))
    hook.on_stored(_record(ran), job=ran, created=True)
    hook.on_stored(_record(skipped, error="fetch_failed"), job=skipped, created=True)  # never reached a batch
    hook.on_stored(_record(ran), job=ran, created=False)  # a redelivery of it, answered from the record
    lines = [(entry.getMessage().split()[0], getattr(entry, "job_id", None), getattr(entry, "batch_id", None)) for entry in caplog.records]
    assert lines == [("received", "ran", None), ("retried", "ran", None), ("batch", None, "w1-3"),
                     ("stored", "ran", "w1-3"), ("stored", "skipped", None), ("stored", "ran", None)]
    received, retried, batch, stored = caplog.records[:4]
    assert received.queue_wait_s >= 2 and retried.code == error.code  # type: ignore[attr-defined]
    assert batch.job_ids == ["ran"] and stored.status == "succeeded" and caplog.records[4].code == "fetch_failed"  # type: ignore[attr-defined]


def test_the_batch_memory_is_bounded() -> None:
    hook = JobLog()
    for n in range(3):
        hook.on_batch(BatchReport(size=5000, generate_s=0.1, real_tokens=1, padded_tokens=1, executions=1, duplicate_executions=0,
                                  oom_splits=0, batch_id=f"b{n}", job_ids=tuple(f"{n}-{i}" for i in range(5000))))
    assert len(hook._batch_of) == 10_000 and "0-0" not in hook._batch_of and "2-4999" in hook._batch_of
