"""The ledger of unacked messages: duplicates follow the first delivery, settles survive a lost channel."""

from __future__ import annotations

from worker.ledger import Ledger


class FakeQueue:
    def __init__(self, *, broken: bool = False, owned: bool = True) -> None:
        self.broken = broken
        self.owned = owned
        self.acked: list[str] = []
        self.requeued: list[str] = []
        self.ack_calls = 0

    def ack(self, tag: str) -> bool:
        if self.broken:
            raise ConnectionError("broker gone")
        if self.owned:
            self.acked.append(tag)
        return self.owned

    def ack_many(self, tags: list[str]) -> list[bool]:
        if self.broken:
            raise ConnectionError("broker gone")
        self.ack_calls += 1
        return [self.ack(tag) for tag in tags]

    def requeue(self, tag: str) -> bool:
        if self.broken:
            raise ConnectionError("broker gone")
        self.requeued.append(tag)
        return True


def test_second_delivery_of_a_held_job_is_settled_with_the_first() -> None:
    channel = FakeQueue()
    ledger = Ledger(channel)
    assert ledger.hold("job", "t1")
    assert not ledger.hold("job", "t2")  # a duplicate publish: another tag
    assert not ledger.hold("job", "t1")  # the same message restored and delivered again
    ledger.settle("job", "ack")
    assert channel.acked == ["t1", "t2"]  # each distinct tag once
    assert "job" not in ledger and ledger.stats.duplicate_deliveries == 2


def test_settles_are_kept_while_redis_is_away_and_done_in_order_after() -> None:
    queue = FakeQueue(broken=True)
    ledger = Ledger(queue)
    ledger.hold("a", "ta")
    ledger.hold("b", "tb")
    ledger.settle("a", "ack")
    ledger.settle("b", "requeue")  # waits behind the first failure without trying
    ledger.retry_unsettled()
    assert ledger.unsettled == 2 and ledger.stats.settle_failures == 2
    queue.broken = False  # Redis is back
    ledger.retry_unsettled()
    assert queue.acked == ["ta"] and queue.requeued == ["tb"] and ledger.unsettled == 0


def test_a_settle_redis_refuses_is_counted_and_not_retried() -> None:
    queue = FakeQueue(owned=False)  # restored to another worker meanwhile
    ledger = Ledger(queue)
    ledger.hold("late", "t")
    ledger.settle("late", "ack", received_at=0.0)  # monotonic 0: held for ages
    assert ledger.stats.refused_settles == 1 and ledger.stats.acked == 0 and ledger.unsettled == 0
    assert ledger.stats.max_hold_s > 5


def test_a_batchs_acks_are_one_call_and_a_failed_one_is_retried_in_order() -> None:
    channel = FakeQueue()
    ledger = Ledger(channel)
    for name in ("a", "b", "c", "d"):
        ledger.hold(name, f"t-{name}")
    ledger.hold("a", "t-a2")  # a duplicate delivery settles with its job
    ledger.settle_many([("a", "ack", None), ("b", "requeue", None), ("c", "ack", None)])
    assert channel.ack_calls == 1 and channel.acked == ["t-a", "t-a2", "t-c"] and channel.requeued == ["t-b"]
    assert ledger.stats.acked == 3 and ledger.stats.requeued == 1

    channel.broken = True
    ledger.settle_many([("d", "ack", None)])
    assert ledger.unsettled == 1 and ledger.stats.settle_failures == 1
    channel.broken = False
    ledger.retry_unsettled()
    assert channel.acked[-1] == "t-d" and ledger.unsettled == 0 and len(ledger) == 0


def test_a_refused_ack_in_a_batch_is_counted_and_the_others_are_acked() -> None:
    channel = FakeQueue(owned=False)
    ledger = Ledger(channel)
    ledger.hold("x", "t-x")
    ledger.hold("y", "t-y")
    ledger.settle_many([("x", "ack", None), ("y", "ack", None)])
    assert ledger.stats.refused_settles == 2 and ledger.stats.acked == 0 and ledger.unsettled == 0
