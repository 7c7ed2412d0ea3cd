from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.batching import MicroBatcher, padding_efficiency


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


# -- padding-aware batching (max_tokens > 0) ----------------------------------------------


def test_padding_aware_groups_similar_prompt_lengths() -> None:
    clock = Clock()
    batcher: MicroBatcher[str] = MicroBatcher(max_size=2, max_delay_s=1.0, max_tokens=10_000, clock=clock)
    for name, cost in [("a300", 300), ("b100", 100), ("c310", 310), ("d105", 105)]:
        batcher.add("g", name, cost=cost)
        clock.now += 0.01
    # The oldest (a300) goes first, with its closest neighbour in length; then the short pair.
    assert batcher.take() == ["a300", "c310"]
    assert batcher.take() == ["b100", "d105"]
    assert len(batcher) == 0


def test_padding_blind_when_off_is_first_come_first_served() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=2, max_delay_s=1.0)
    for name, cost in [("a300", 300), ("b100", 100), ("c310", 310), ("d105", 105)]:
        batcher.add("g", name, cost=cost)
    assert batcher.take() == ["a300", "b100"]
    assert batcher.take() == ["c310", "d105"]


def test_token_budget_limits_the_batch_and_makes_it_due() -> None:
    clock = Clock()
    batcher: MicroBatcher[int] = MicroBatcher(max_size=8, max_delay_s=1.0, max_tokens=1000, clock=clock)
    for item in range(4):
        batcher.add("g", item, cost=300)
    # 3 x 300 fits in 1000 padded tokens, 4 x 300 does not: a complete batch of 3, due now.
    assert batcher.next_due_in() == 0.0
    assert batcher.take() == [0, 1, 2]
    assert batcher.take() == []  # the fourth waits for company or for its delay
    clock.now = 1.0
    assert batcher.take() == [3]


def test_an_item_over_the_budget_runs_alone() -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=4, max_delay_s=10.0, max_tokens=500)
    batcher.add("g", "huge", cost=900)
    batcher.add("g", "small", cost=100)
    assert batcher.take() == ["huge"]
    assert batcher.take() == []
    assert len(batcher) == 1


def test_the_oldest_item_is_never_starved_by_better_fitting_ones() -> None:
    clock = Clock()
    batcher: MicroBatcher[str] = MicroBatcher(max_size=3, max_delay_s=0.5, max_tokens=100_000, clock=clock)
    batcher.add("g", "odd", cost=900)
    for round_ in range(5):
        for i in range(3):
            batcher.add("g", f"r{round_}-{i}", cost=100)
        batch = batcher.take()
        assert batch, "a group with 3+ items is complete"
        if "odd" in batch:
            break
    else:
        raise AssertionError("the oldest item never ran")
    assert round_ == 0


def test_arrival_time_backdates_the_delay() -> None:
    clock = Clock()
    clock.now = 5.0
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_delay_s=0.5, max_tokens=4096, clock=clock)
    batcher.add("g", "late-ready", cost=100, arrived_at=4.0)  # its message came 1 s ago
    assert batcher.next_due_in() == 0.0
    assert batcher.take() == ["late-ready"]


def test_complete_only_ignores_aged_partial_batches() -> None:
    clock = Clock()
    batcher: MicroBatcher[int] = MicroBatcher(max_size=4, max_delay_s=0.1, clock=clock)
    batcher.add("g", 1)
    clock.now = 1.0
    assert batcher.take(complete_only=True) == []
    assert not batcher.has_complete()
    for item in range(2, 5):
        batcher.add("g", item)
    assert batcher.has_complete()
    assert batcher.take(complete_only=True) == [1, 2, 3, 4]


def test_padding_efficiency() -> None:
    assert padding_efficiency([[100, 100], [50]]) == 1.0
    assert padding_efficiency([[100, 50]]) == 0.75
    assert padding_efficiency([]) == 1.0


@settings(max_examples=200, deadline=None)
@given(
    max_size=st.integers(1, 6),
    max_tokens=st.sampled_from([0, 300, 1000, 5000]),
    ops=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 600), st.booleans()), max_size=40),
)
def test_batches_respect_size_budget_groups_and_lose_nothing(max_size: int, max_tokens: int, ops: list[tuple[str, int, bool]]) -> None:
    clock = Clock()
    batcher: MicroBatcher[tuple[str, int, int]] = MicroBatcher(max_size=max_size, max_delay_s=1.0, max_tokens=max_tokens, clock=clock)
    added, taken = [], []
    waiting: dict[str, list[tuple[str, int, int]]] = {"a": [], "b": []}

    def check(batch: list[tuple[str, int, int]]) -> None:
        assert 1 <= len(batch) <= max_size
        key = batch[0][0]
        assert all(item[0] == key for item in batch)
        if max_tokens and len(batch) > 1:
            assert len(batch) * max(item[1] for item in batch) <= max_tokens
        if max_tokens:
            assert min(waiting[key], key=lambda item: item[2]) in batch  # the oldest is never passed over
        for item in batch:
            waiting[key].remove(item)
        taken.extend(batch)

    for index, (key, cost, tick) in enumerate(ops):
        item = (key, cost, index)
        batcher.add(key, item, cost=cost)
        added.append(item)
        waiting[key].append(item)
        if tick:
            clock.now += 0.6
            if batch := batcher.take():
                check(batch)
    clock.now += 10
    while batch := batcher.take():
        check(batch)
    assert sorted(taken) == sorted(added) and len(batcher) == 0
