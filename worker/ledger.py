"""The messages this worker holds unacknowledged, and settling them: ack, or hand back to the queue.

* Messages are settled by tag on the queue (worker/broker.py), not through the connection they
  came in on: a job held across a Redis restart is acked after it like any other.
* The same job can arrive twice while this worker still holds it (a duplicate publish, or an old
  worker's shared unacked set restored during a rolling upgrade). The second delivery does not run
  the model again: its tag is settled together with the first one's outcome.
* A worker owns only the messages in its own unacked hash (worker/broker.py). If it was presumed
  dead (paused, or cut off from Redis, past the heartbeat timeout), they were restored to other
  workers: its late ack or hand-back is refused by Redis, counted here, and changes nothing.
* A settle that cannot reach Redis is kept and retried on the next tick, instead of leaving the
  message to come back after the heartbeat timeout (and the job to run again).

Only the consumer thread uses a ledger.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger(__name__)

Action = Literal["ack", "requeue"]


class SettlesByTag(Protocol):
    """What a ledger settles on: worker.broker.RedisQueue."""

    def ack(self, tag: str) -> bool: ...

    def ack_many(self, tags: list[str]) -> list[bool]: ...

    def requeue(self, tag: str) -> bool: ...


@dataclass
class LedgerStats:
    """Counters the metrics endpoint reads."""

    acked: int = 0
    requeued: int = 0
    duplicate_deliveries: int = 0  # deliveries of a job this worker already held
    settle_failures: int = 0
    # Acks and hand-backs Redis refused: the delivery was no longer this worker's (restored to
    # another after its heartbeat timed out).
    refused_settles: int = 0
    max_hold_s: float = 0.0  # longest a settled message stayed unacknowledged
    # Messages this worker's restore put back on the queue (a dead worker's, or an old worker's
    # past the visibility timeout); the broker's restore step feeds it (worker/consumer.py).
    restored: int = 0


class Ledger:
    """Delivery tags held per job id; settles them on ``queue``."""

    def __init__(self, queue: SettlesByTag) -> None:
        self.stats = LedgerStats()
        self._tags: dict[str, list[str]] = {}
        self._unsettled: list[tuple[str, Action]] = []
        self._queue = queue

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
        self.settle_many([(job_id, action, received_at)])

    def settle_many(self, settles: list[tuple[str, Action, float | None]]) -> None:
        """:meth:`settle` for each (job id, action, received at); the acks go to Redis in one round trip (issue 14)."""
        acks: list[str] = []
        for job_id, action, received_at in settles:
            for tag in self._tags.pop(job_id, []):
                if action == "ack":
                    acks.append(tag)
                else:
                    self._settle_tag(tag, action)
            if received_at is not None:
                self._note_hold(time.monotonic() - received_at)
        if not acks:
            return
        if self._unsettled:  # behind earlier failures, wait in line: Redis is probably still away
            self._unsettled.extend((tag, "ack") for tag in acks)
            return
        try:
            owned = self._queue.ack_many(acks)
        except Exception as exc:  # noqa: BLE001 - any broker error: keep them and retry on the next tick
            self.stats.settle_failures += 1
            log.warning("could not ack %d messages (%s: %s); retrying", len(acks), type(exc).__name__, exc)
            self._unsettled.extend((tag, "ack") for tag in acks)
            return
        for tag, mine in zip(acks, owned, strict=True):
            self._count(tag, "ack", owned=mine)

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
            owned = self._queue.ack(tag) if action == "ack" else self._queue.requeue(tag)
        except Exception as exc:  # noqa: BLE001 - any broker error: keep it and retry on the next tick
            self.stats.settle_failures += 1
            if not quiet:
                log.warning("could not %s message %s (%s: %s); retrying", action, tag, type(exc).__name__, exc)
            return False
        self._count(tag, action, owned=owned)
        return True

    def _count(self, tag: str, action: Action, *, owned: bool) -> None:
        if not owned:
            self.stats.refused_settles += 1
            log.warning("%s of message %s refused: it is no longer this worker's (restored to another after a missed heartbeat)", action, tag)
        elif action == "ack":
            self.stats.acked += 1
        else:
            self.stats.requeued += 1

    def _note_hold(self, held_s: float) -> None:
        # No warning however long: a live worker keeps its messages (its heartbeat says it is alive).
        self.stats.max_hold_s = max(self.stats.max_hold_s, held_s)
