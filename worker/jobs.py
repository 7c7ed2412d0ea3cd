"""A job's state inside one worker, from its message to its outcome.

    Pending    a received job: its message, attempts, delivery count; owned by the consumer
               thread, lent to the fetch pool (to fill ``prepared``) and to the model thread
    Prepared   what the fetch stage made of it: engine inputs, an existing record, or an error
    Outcome    what the consumer must do with its message: ack, retry later, or hand back
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from producer.errors import VQAError
from producer.schema import Job, Record, utcnow


@dataclass
class Prepared:
    """What the fetch stage produced for a job: engine inputs, an existing record, or an error."""

    inputs: Any = None  # Engine.prepare() of the image and question
    cost: int = 0  # Engine.cost(inputs): what padding-aware batching groups by
    existing: Record | None = None  # a success record already stored: nothing to run
    error: VQAError | None = None
    fetch_ms: float | None = None
    preprocess_ms: float | None = None  # Engine.prepare() of the fetched image
    # Deliveries of the job that reached a model and never came back, before this one
    # (worker/counters.py): read on the fetch pool so the model thread does not wait for it.
    earlier_deliveries: int = 0
    # Content hash of the job's image (engine inputs' ``image_key``; set when prefix sharing is
    # on): the batcher puts one image's questions together (worker/batching.py).
    image_key: str | None = None
    # The image this job shares with others (worker/imageshare.py): held here so that jobs
    # arriving while this one is in the worker find it; dropped with the job.
    shared_image: Any = None


@dataclass
class Pending:
    """A received job. ``message`` is its queue message (worker.intake.QueueMessage): only the consumer thread touches it."""

    job: Job
    message: Any
    received_at: float
    attempt: int = 1
    prepared: Prepared | None = None  # set by the fetch pool before the job reaches the batcher
    not_before: float = 0.0
    started_at: datetime | None = None
    deliveries: int = 0  # this delivery's count once it reached the model (0: not yet)


@dataclass
class Outcome:
    """What the consumer thread must do with the job's message."""

    pending: Pending
    action: Literal["ack", "retry", "requeue"]
    delay_s: float = 0.0
    record: Record | None = None
    error: VQAError | None = None  # why a retry is needed


def seconds_since(moment: datetime | None) -> float:
    """Wall-clock seconds since ``moment`` (a producer's or a model thread's time), never negative: hosts' clocks differ."""
    return 0.0 if moment is None else max(0.0, (utcnow() - moment).total_seconds())
