"""How long a healthy worker may hold a message unacknowledged, checked against the visibility timeout.

Under the Redis broker a delivered message stays in Redis's ``unacked`` set until it is acked;
once it is older than ``visibility_timeout`` any consumer's poll cycle hands it to the queue
again. The clock starts when the worker *receives* the message, so the time it waits in the
prefetch buffer counts, not only the batch it runs in. The worst case on a healthy worker:

    max_batch_delay                              waiting for the batch to fill
  + (batches ahead + 1) x batch time             the prefetch holds 2 batches (3 padding-aware), plus its own
  + max_attempts x fetch_timeout + backoffs      transient retries keep the message
  + a store allowance                            S3 and result backend writes

``visibility_timeout`` should be at least twice that; below the worst case itself a slow but
healthy worker has its jobs run twice (docs/reliability.md).
"""

from __future__ import annotations

from producer.settings import Settings
from worker.batching import prefetch_batches

STORE_ALLOWANCE_S = 2.0
SAFETY_FACTOR = 2.0


def retry_backoff_total_s(max_attempts: int, *, base_s: float = 0.5, cap_s: float = 30.0) -> float:
    """Upper bound of the sum of the backoffs between attempts (worker.runner._backoff)."""
    return sum(min(cap_s, base_s * 2**attempt) for attempt in range(1, max_attempts))


def hold_budget_s(settings: Settings, *, batch_s: float) -> float:
    """The longest a healthy worker holds a message, for batches taking ``batch_s`` seconds."""
    return (
        settings.max_batch_delay_ms / 1000
        + (prefetch_batches(settings.max_batch_tokens) + 1) * batch_s
        + settings.max_attempts * settings.fetch_timeout_s
        + retry_backoff_total_s(settings.max_attempts)
        + STORE_ALLOWANCE_S
    )


def check(settings: Settings, *, batch_s: float) -> str | None:
    """A warning when ``visibility_timeout`` is below the safe value for batches of ``batch_s``; else None."""
    budget = hold_budget_s(settings, batch_s=batch_s)
    wanted = SAFETY_FACTOR * budget
    if settings.visibility_timeout >= wanted:
        return None
    measured = f"batches of {batch_s:.1f} s" if batch_s else "before any batch ran"
    return (
        f"VQA_VISIBILITY_TIMEOUT={settings.visibility_timeout} s is below {wanted:.0f} s, twice the "
        f"{budget:.1f} s a healthy worker may hold a message ({measured}: batch delay, "
        f"{prefetch_batches(settings.max_batch_tokens) + 1} batches, {settings.max_attempts} fetch attempts with backoff); "
        "slow jobs may be handed to a second worker and run twice"
    )
