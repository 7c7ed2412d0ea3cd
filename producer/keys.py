"""Every S3 key and Redis key name in one place."""

from __future__ import annotations

TASK_NAME = "vqa.answer"


def result_key(prefix: str, job_id: str) -> str:
    return f"{prefix}results/{job_id}.json"


def failed_key(prefix: str, job_id: str) -> str:
    return f"{prefix}failed/{job_id}.json"


def submitted_key(job_id: str) -> str:
    """Set (NX, with a TTL) when a producer enqueues a job, so duplicates are not enqueued twice."""
    return f"vqa:submitted:{job_id}"


def deliveries_key(job_id: str) -> str:
    """Counts how often a worker picked the job up; past the limit the job is poison."""
    return f"vqa:deliveries:{job_id}"


def executions_key(job_id: str) -> str:
    """Counts model executions per job so redelivery duplicates are visible."""
    return f"vqa:executions:{job_id}"
