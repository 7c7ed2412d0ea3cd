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


def revoked_key(job_id: str) -> str:
    """Set (with a TTL) when a job is cancelled; every worker drops the job before it reaches the model."""
    return f"vqa:revoked:{job_id}"


def deliveries_key(job_id: str) -> str:
    """Counts deliveries that reached the model and never came back from it; past the limit the job is poison.

    Reset once the model answers (or fails) the job: only crashes in the model count against it.
    """
    return f"vqa:deliveries:{job_id}"


def executions_key(job_id: str) -> str:
    """Counts model executions per job so redelivery duplicates are visible."""
    return f"vqa:executions:{job_id}"


def dead_letters_key(queue: str) -> str:
    """List of rejected queue entries (newest first) with the reason each was refused (worker/intake.py); capped."""
    return f"vqa:dead-letters:{queue}"


def unacked_key(queue: str) -> str:
    """Hash: delivery tag -> raw message, for every message a worker took and has not acked (worker/broker.py)."""
    return f"vqa:unacked:{queue}"


def unacked_index_key(queue: str) -> str:
    """Sorted set: delivery tag -> the Redis time it was taken; past the visibility timeout it goes back to the queue."""
    return f"vqa:unacked-index:{queue}"


# kombu's Redis transport keeps one list per priority step: a message with priority p (0-9,
# clamped) goes to the list of the highest step <= p; the bare name holds steps 0-2 and is
# served first (in Celery on Redis, a lower number is a higher priority).
PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEP = "\x06\x16"

# Our priority lanes, as the Celery priorities they publish with: one per step, so each lane
# is a list of its own. "default" is not 0 so that "high" can be above it; Celery's own
# send_task through our app lands in "default" too (producer/celery_app.py routes it so), and
# only a message with no priority at all, from some other Celery app, lands in the bare list.
PRIORITIES = {"high": 0, "default": 3, "low": 6}
DEFAULT_PRIORITY = PRIORITIES["default"]


def priority_queue_keys(queue: str) -> list[str]:
    """The lists of ``queue``, one per priority step, in the order a worker serves them."""
    return [queue if step == 0 else f"{queue}{_PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def priority_queue_key(queue: str, priority: int) -> str:
    """The list kombu's Redis transport puts a message of Celery priority ``priority`` (0-9) in."""
    clamped = max(0, min(int(priority), 9))
    step = max(step for step in PRIORITY_STEPS if step <= clamped)
    return queue if step == 0 else f"{queue}{_PRIORITY_SEP}{step}"
