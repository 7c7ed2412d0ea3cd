"""A job's life in the worker's log, one line per step, each carrying the job's id as a field (a lifecycle hook).

    received   job_id, bulk_id, queue_wait_s          consumer thread
    retried    job_id, code, delay_s                   consumer thread
    batch ran  batch_id, job_ids, size, generate_s      writer thread
    stored     job_id, batch_id, status, code          the writer thread
    rejected   tag, reason                             consumer thread

With ``VQA_LOG_FORMAT=json`` each is a JSON object with those fields (producer/logs.py), so a
job is followed from the producer's "submitted" line to its record by ``job_id``. The lines are
written by hook points, which never run on the model thread (worker/hooks.py); at INFO they cost
a few microseconds per job, and ``VQA_LOG_LEVEL=WARNING`` turns them off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from producer.errors import VQAError
from producer.schema import Job, Record
from worker.hooks import BatchReport, Hook
from worker.jobs import seconds_since

log = logging.getLogger("vqa.jobs")

_REMEMBERED = 10_000


class JobLog(Hook):
    """Logs each job's steps with its id and, once it ran in the model, its batch's id."""

    def __init__(self) -> None:
        # job id -> the batch it ran in: set on the writer thread by on_batch, which comes before
        # the job's on_stored (worker/runner.py), and popped there.
        self._batch_of: dict[str, str] = {}

    def on_received(self, job: Job, headers: Mapping[str, Any]) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("received job %s", job.job_id,
                     extra={"job_id": job.job_id, "bulk_id": job.bulk_id, "queue_wait_s": round(seconds_since(job.submitted_at), 3)})

    def on_retried(self, job: Job, error: VQAError, delay_s: float) -> None:
        log.info("retried job %s in %.1f s (%s)", job.job_id, delay_s, error.code,
                 extra={"job_id": job.job_id, "code": error.code, "delay_s": round(delay_s, 3)})

    def on_rejected(self, tag: str, reason: str) -> None:
        log.info("rejected message %s", tag, extra={"tag": tag, "reason": reason[:300]})

    def on_batch(self, report: BatchReport) -> None:
        for job_id in report.job_ids:
            self._batch_of[job_id] = report.batch_id
        while len(self._batch_of) > _REMEMBERED:  # jobs whose record was never stored here (handed back)
            del self._batch_of[next(iter(self._batch_of))]
        if log.isEnabledFor(logging.INFO):
            log.info("batch %s ran %d jobs in %.3f s", report.batch_id, report.size, report.generate_s,
                     extra={"batch_id": report.batch_id, "job_ids": list(report.job_ids), "size": report.size,
                            "generate_s": round(report.generate_s, 4), "real_tokens": report.real_tokens,
                            "padded_tokens": report.padded_tokens})

    def on_stored(self, record: Record, *, job: Job, created: bool) -> None:
        batch_id = self._batch_of.pop(record.job_id, None)
        if log.isEnabledFor(logging.INFO):
            code = record.error.code if record.error is not None else None
            log.info("stored job %s: %s%s", record.job_id, record.status, f" ({code})" if code else "",
                     extra={"job_id": record.job_id, "batch_id": batch_id, "status": record.status, "code": code,
                            "new_record": created, "bulk_id": record.bulk_id})

