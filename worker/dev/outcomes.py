"""A stand-in for a worker's model, for bulk-run tests and benchmarks: take jobs off the queue, store made-up outcomes.

Messages are read with the worker's own intake (worker/intake.py) and every outcome goes
through the worker's own bulk hook (worker/bulkruns.py), so only the model and the record
writes are skipped: the counting, the completion log and its S3 segments are the real ones.
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from producer.schema import ErrorInfo, Job, Record, Usage, utcnow
from worker.bulkruns import BulkRuns
from worker.intake import read_message


def record_for(job: Job, *, status: str = "succeeded", answer: str = "a made-up answer") -> Record:
    """The record a worker would store for ``job``: succeeded, or failed/cancelled/expired with that error code."""
    failed = status != "succeeded"
    return Record(
        job_id=job.job_id,
        status="failed" if failed else "succeeded",
        image_url=job.image_url,
        question=job.question,
        answer=None if failed else answer,
        model=job.model,
        quantization="none",
        generation=job.generation,
        attempts=1,
        executions=0 if failed else 1,
        worker="outcomes",
        batch_size=1,
        submitted_at=job.submitted_at,
        started_at=utcnow(),
        finished_at=utcnow(),
        error=ErrorInfo(code=status, message=f"made up: {status}", retryable=False) if failed else None,
        usage=None if failed else Usage(prompt_tokens=120, image_tokens=100, generated_tokens=8, model_ms=12.5),
        bulk_id=job.bulk_id,
        custom_id=job.custom_id,
    )


def take_jobs(client: redis.Redis, queue_key: str, limit: int) -> list[Job]:
    """Up to ``limit`` jobs off the queue, oldest first (what a worker's pop would take)."""
    raw = client.rpop(queue_key, limit) or []
    return [read_message("outcomes", item)[1] for item in raw]


def finish(hook: BulkRuns, jobs: list[Job], *, status: Callable[[Job], str] = lambda job: "succeeded", redeliver: bool = False) -> None:
    """Start and store each job through the bulk hook, as the worker's status and store threads do.

    ``redeliver`` stores every record a second time with ``created=False``, as a redelivery does.
    """
    hook.on_started(jobs)
    for job in jobs:
        record = record_for(job, status=status(job))
        hook.on_stored(record, job=job, created=True)
        if redeliver:
            hook.on_stored(record, job=job, created=False)
