"""The messages this worker holds unacknowledged, and settling them: ack, or hand back to the queue.

* Messages are settled by tag on the queue (worker/broker.py), not through the connection they
  came in on: a job held across a Redis restart is acked after it like any other.
* The same job can arrive twice while this worker still holds it (a duplicate publish, or the
  visibility timeout handing back a message we are slow with). The second delivery does not run
  the model again: its tag is settled together with the first one's outcome.
* A settle that cannot reach Redis is kept and retried on the next tick, instead of leaving the
  message to come back after the visibility timeout (and the job to run again).

Only the consumer thread uses a ledger.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

Action = Literal["ack", "requeue"]

_WARN_EVERY_S = 60.0


class SettlesByTag(Protocol):
    """What a ledger settles on: worker.broker.RedisQueue."""

    def ack(self, tag: str) -> None: ...

    def requeue(self, tag: str) -> bool: ...


@dataclass
class LedgerStats:
    """Counters the metrics endpoint reads."""

    acked: int = 0
    requeued: int = 0
    duplicate_deliveries: int = 0  # deliveries of a job this worker already held
    settle_failures: int = 0
    max_hold_s: float = 0.0  # longest a settled message stayed unacknowledged
    # Messages this worker's restore put back on the queue (a dead worker's, or past the
    # visibility timeout); the broker's restore step feeds it (worker/consumer.py).
    restored: int = 0


class Ledger:
    """Delivery tags held per job id; settles them on ``queue``."""

    def __init__(self, queue: SettlesByTag, *, visibility_timeout: float) -> None:
        self.visibility_timeout = visibility_timeout
        self.stats = LedgerStats()
        self._tags: dict[str, list[str]] = {}
        self._unsettled: list[tuple[str, Action]] = []
        self._queue = queue
        self._warned_at = float("-inf")

    def __len__(self) -> int:
        return len(self._tags)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._tags

    def job_ids(self) -> list[str]:
        return list(self._tags)

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    def hold(self, job_id: str, delivery_tag: str) -> bool:
        """Record a delivery. False when the job is already held: this delivery settles with the first."""
        tags = self._tags.get(job_id)
        if tags is None:
            self._tags[job_id] = [delivery_tag]
            return True
        if delivery_tag not in tags:
            tags.append(delivery_tag)
        self.stats.duplicate_deliveries += 1
        return False

    def settle(self, job_id: str, action: Action, *, received_at: float | None = None) -> None:
        """Ack (the record is stored) or requeue every delivery of the job this worker holds."""
        for tag in self._tags.pop(job_id, []):
            self._settle_tag(tag, action)
        if received_at is not None:
            self._note_hold(job_id, time.monotonic() - received_at)

    def retry_unsettled(self) -> None:
        """Settle what could not be settled before, in order; stop at the first failure (Redis still away)."""
        while self._unsettled:
            tag, action = self._unsettled[0]
            if not self._try(tag, action, quiet=True):
                return
            self._unsettled.pop(0)
            if not self._unsettled:
                log.info("settled the messages held across a broker outage")

    def _settle_tag(self, tag: str, action: Action) -> None:
        # Behind earlier failures, wait in line: Redis is probably still away.
        if self._unsettled or not self._try(tag, action):
            self._unsettled.append((tag, action))

    def _try(self, tag: str, action: Action, *, quiet: bool = False) -> bool:
        try:
            if action == "ack":
                self._queue.ack(tag)
            else:
                self._queue.requeue(tag)
        except Exception as exc:  # noqa: BLE001 - any broker error: keep it and retry on the next tick
            self.stats.settle_failures += 1
            if not quiet:
                log.warning("could not %s message %s (%s: %s); retrying", action, tag, type(exc).__name__, exc)
            return False
        if action == "ack":
            self.stats.acked += 1
        else:
            self.stats.requeued += 1
        return True

    def _note_hold(self, job_id: str, held_s: float) -> None:
        self.stats.max_hold_s = max(self.stats.max_hold_s, held_s)
        now = time.monotonic()
        if held_s > self.visibility_timeout / 2 and now - self._warned_at > _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "job %s stayed unacknowledged %.1f s, over half the visibility timeout (%d s): past it, Redis hands "
                "the message to another worker and the job may run twice. Raise VQA_VISIBILITY_TIMEOUT "
                "(see docs/reliability.md)",
                job_id,
                held_s,
                self.visibility_timeout,
            )
