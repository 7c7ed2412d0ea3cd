from __future__ import annotations

from worker.batching import MicroBatcher


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_flushes_when_full_before_the_delay() -> None:
    clock = Clock()
    batcher: MicroBatcher[int] = MicroBatcher(max_size=3, max_delay_s=1.0, clock=clock)
    for item in range(4):
        batcher.add("g", item)
    assert batcher.next_due_in() == 0.0
    assert batcher.take() == [0, 1, 2]
    assert batcher.take() == []  # the leftover is not due yet
    clock.now = 1.0
    assert batcher.take() == [3]


def test_flushes_after_the_delay_when_not_full() -> None:
    clock = Clock()
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_delay_s=0.5, clock=clock)
    batcher.add("g", "a")
    clock.now = 0.2
    batcher.add("g", "b")
    assert batcher.take() == []
    assert abs(batcher.next_due_in() - 0.3) < 1e-9
    clock.now = 0.5
    assert batcher.take() == ["a", "b"]
    assert batcher.next_due_in() is None


def test_different_settings_never_share_a_batch_and_oldest_goes_first() -> None:
    clock = Clock()
    batcher: MicroBatcher[str] = MicroBatcher(max_size=4, max_delay_s=0.1, clock=clock)
    batcher.add("short", "s1")
    clock.now = 0.05
    batcher.add("long", "l1")
    batcher.add("short", "s2")
    clock.now = 1.0
    assert batcher.take() == ["s1", "s2"]
    assert batcher.take() == ["l1"]


def test_drain_returns_everything() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=2, max_delay_s=10)
    for item in range(5):
        batcher.add(item % 2, item)
    assert sorted(batcher.drain()) == [0, 1, 2, 3, 4]
    assert len(batcher) == 0
