"""The ledger of unacked messages: duplicates follow the first delivery, settles survive a lost channel."""

from __future__ import annotations

import logging

import pytest

from worker.ledger import Ledger


class FakeQueue:
    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken
        self.acked: list[str] = []
        self.requeued: list[str] = []

    def ack(self, tag: str) -> None:
        if self.broken:
            raise ConnectionError("broker gone")
        self.acked.append(tag)

    def requeue(self, tag: str) -> bool:
        if self.broken:
            raise ConnectionError("broker gone")
        self.requeued.append(tag)
        return True


def test_second_delivery_of_a_held_job_is_settled_with_the_first() -> None:
    channel = FakeQueue()
    ledger = Ledger(channel, visibility_timeout=60)
    assert ledger.hold("job", "t1")
    assert not ledger.hold("job", "t2")  # a duplicate publish: another tag
    assert not ledger.hold("job", "t1")  # the same message restored and delivered again
    ledger.settle("job", "ack")
    assert channel.acked == ["t1", "t2"]  # each distinct tag once
    assert "job" not in ledger and ledger.stats.duplicate_deliveries == 2


def test_settles_are_kept_while_redis_is_away_and_done_in_order_after() -> None:
    queue = FakeQueue(broken=True)
    ledger = Ledger(queue, visibility_timeout=60)
    ledger.hold("a", "ta")
    ledger.hold("b", "tb")
    ledger.settle("a", "ack")
    ledger.settle("b", "requeue")  # waits behind the first failure without trying
    ledger.retry_unsettled()
    assert ledger.unsettled == 2 and ledger.stats.settle_failures == 2
    queue.broken = False  # Redis is back
    ledger.retry_unsettled()
    assert queue.acked == ["ta"] and queue.requeued == ["tb"] and ledger.unsettled == 0


def test_long_hold_warns_about_the_visibility_timeout(caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(FakeQueue(), visibility_timeout=10)
    ledger.hold("slow", "t")
    with caplog.at_level(logging.WARNING, logger="worker.ledger"):
        ledger.settle("slow", "ack", received_at=0.0)  # monotonic 0: held for ages
    assert "VQA_VISIBILITY_TIMEOUT" in caplog.text
    assert ledger.stats.max_hold_s > 5
