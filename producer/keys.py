"""Every S3 key and Redis key name in one place."""

from __future__ import annotations

TASK_NAME = "vqa.answer"


def result_key(prefix: str, job_id: str) -> str:
    return f"{prefix}results/{job_id}.json"


def failed_key(prefix: str, job_id: str) -> str:
    return f"{prefix}failed/{job_id}.json"


def failed_mark_key(job_id: str) -> str:
    """Set (no TTL) before a failed record is written: only then may a success have a failed record to delete.

    Spares the common first-delivery success its S3 DELETE of a failed record that does not exist.
    """
    return f"vqa:failed-mark:{job_id}"


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
    """The shared unacked hash of workers before per-worker ownership (delivery tag -> raw message).

    New workers take nothing into it; they restore what old workers left there after the
    visibility timeout, so a rolling upgrade loses nothing (worker/broker.py).
    """
    return f"vqa:unacked:{queue}"


def unacked_index_key(queue: str) -> str:
    """Sorted set beside :func:`unacked_key`: delivery tag -> the Redis time it was taken."""
    return f"vqa:unacked-index:{queue}"


def worker_unacked_prefix(queue: str) -> str:
    """What a worker's own unacked hash name starts with; the consumer id follows."""
    return f"vqa:unacked:{queue}:worker:"


def worker_unacked_key(queue: str, consumer_id: str) -> str:
    """Hash: delivery id -> raw message, for every message this one worker took and has not settled."""
    return worker_unacked_prefix(queue) + consumer_id


def heartbeats_key(queue: str) -> str:
    """Sorted set: consumer id -> the Redis time of its last heartbeat; an old one means a dead worker."""
    return f"vqa:heartbeats:{queue}"


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
# -- bulk runs (producer/bulk/, worker/bulkruns.py) ---------------------------------------------
# Redis holds a run's window, not the run: its counters, the jobs published and not finished, and
# the completion log until it is sealed into S3 segments. Every key has a TTL, refreshed while the
# run moves and shortened once it ends; what lasts is in S3 under bulk_prefix().


def bulk_meta_key(bulk_id: str) -> str:
    """Hash: the run's options, state, manifest cursor, counters and usage sums."""
    return f"vqa:bulk:{bulk_id}:meta"


def bulk_inflight_key(bulk_id: str) -> str:
    """Set: job ids published and without an outcome (the window). A worker counts a job when it leaves."""
    return f"vqa:bulk:{bulk_id}:inflight"


def bulk_running_key(bulk_id: str) -> str:
    """Set, a subset of the in-flight set: jobs a worker has started in a model."""
    return f"vqa:bulk:{bulk_id}:running"


def bulk_log_key(bulk_id: str) -> str:
    """List: completion entries (one JSON object per finished job) not yet sealed into a segment."""
    return f"vqa:bulk:{bulk_id}:log"


def bulk_segment_key_prefix(bulk_id: str) -> str:
    """A sealed segment waits under this prefix plus its number until it is written to S3."""
    return f"vqa:bulk:{bulk_id}:segment:"


def bulk_segment_key(bulk_id: str, seq: int) -> str:
    return f"{bulk_segment_key_prefix(bulk_id)}{seq}"


def bulk_sealed_key(bulk_id: str) -> str:
    """Sorted set: segment number -> when it was sealed (or last claimed for its S3 write)."""
    return f"vqa:bulk:{bulk_id}:sealed"


def bulk_invalid_key(bulk_id: str) -> str:
    """List: the run's invalid manifest lines (capped), what invalid.jsonl is written from."""
    return f"vqa:bulk:{bulk_id}:invalid"


def bulk_lease_key(bulk_id: str) -> str:
    """The submitter's lease: one process publishes a run at a time."""
    return f"vqa:bulk:{bulk_id}:lease"


def bulk_prefix(prefix: str, bulk_id: str) -> str:
    """Where a run's lasting objects live in S3."""
    return f"{prefix}bulk/{bulk_id}/"


def bulk_status_object(prefix: str, bulk_id: str) -> str:
    return f"{bulk_prefix(prefix, bulk_id)}status.json"


def bulk_invalid_object(prefix: str, bulk_id: str) -> str:
    return f"{bulk_prefix(prefix, bulk_id)}invalid.jsonl"


def bulk_segments_prefix(prefix: str, bulk_id: str) -> str:
    return f"{bulk_prefix(prefix, bulk_id)}log/"


def bulk_segment_object(prefix: str, bulk_id: str, seq: int) -> str:
    """One sealed segment of the completion log: JSON Lines, numbered so a listing is in order."""
    return f"{bulk_segments_prefix(prefix, bulk_id)}{seq:010d}.jsonl"


# -- the HTTP API (producer/api/) --------------------------------------------------------------


def api_idempotency_key(scope: str, key_digest: str) -> str:
    """The fingerprint of the request first sent with an Idempotency-Key (hashed) on one endpoint."""
    return f"vqa:api:idempotency:{scope}:{key_digest}"


# -- completion events and webhooks (worker/completions.py, producer/webhooks/) -----------------


def event_sent_key(job_id: str) -> str:
    """Set (NX, with a TTL) in the same script that appends the job's completion event: one event per record."""
    return f"vqa:event-sent:{job_id}"


def webhook_pending_key() -> str:
    """Hash: delivery id -> the delivery (JSON: url, body, attempt), for every delivery not done yet."""
    return "vqa:webhooks:pending"


def webhook_due_key() -> str:
    """Sorted set: delivery id -> when it is due (a retry's time, or the lease of one in flight)."""
    return "vqa:webhooks:due"


def webhook_done_key(delivery_id: str) -> str:
    """Set (with a TTL) once a delivery succeeded: a duplicate completion event is not delivered again."""
    return f"vqa:webhooks:done:{delivery_id}"
