from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.clock import ManualClock
from worker.batching import MicroBatcher, padding_efficiency


def test_flushes_when_full_before_the_delay() -> None:
    clock = ManualClock()
    batcher: MicroBatcher[int] = MicroBatcher(max_size=3, max_delay_s=1.0, clock=clock)
    for item in range(4):
        batcher.add("g", item)
    assert batcher.next_due_in() == 0.0
    assert batcher.take() == [0, 1, 2]
    assert batcher.take() == []  # the leftover is not due yet
    clock.now = 1.0
    assert batcher.take() == [3]


def test_flushes_after_the_delay_when_not_full() -> None:
    clock = ManualClock()
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
    clock = ManualClock()
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
    clock = ManualClock()
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
    clock = ManualClock()
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
    clock = ManualClock()
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
    clock = ManualClock()
    clock.now = 5.0
    batcher: MicroBatcher[str] = MicroBatcher(max_size=8, max_delay_s=0.5, max_tokens=4096, clock=clock)
    batcher.add("g", "late-ready", cost=100, arrived_at=4.0)  # its message came 1 s ago
    assert batcher.next_due_in() == 0.0
    assert batcher.take() == ["late-ready"]


def test_complete_only_ignores_aged_partial_batches() -> None:
    clock = ManualClock()
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
    clock = ManualClock()
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


# -- affinity: one image's questions together ------------------------------------------------


def _interleaved(batcher: MicroBatcher[str], images: int, questions: int, *, cost: dict[str, int] | None = None) -> None:
    """img1-q1, img2-q1, img3-q1, img1-q2, ...: independent submissions interleaving."""
    for q in range(questions):
        for i in range(images):
            image = f"img{i}"
            batcher.add("g", f"{image}-q{q}", cost=(cost or {}).get(image, 300) + q, arrived_at=float(q * images + i), affinity=image)


def _images(batch: list[str]) -> list[str]:
    return sorted({item.split("-")[0] for item in batch})


@pytest.mark.parametrize("max_tokens", [0, 10_000], ids=["padding-blind", "padding-aware"])
def test_interleaved_questions_about_one_image_share_a_batch(max_tokens: int) -> None:
    batcher: MicroBatcher[str] = MicroBatcher(max_size=6, max_delay_s=0.0, max_tokens=max_tokens, clock=lambda: 100.0)
    _interleaved(batcher, images=4, questions=3)
    first = batcher.take()
    assert "img0-q0" in first  # the oldest always goes
    assert _images(first) == ["img0", "img1"]  # two whole images, not six different ones
    second = batcher.take()
    assert _images(second) == ["img2", "img3"]
    assert len(batcher) == 0


@pytest.mark.parametrize("max_tokens", [0, 10_000], ids=["padding-blind", "padding-aware"])
def test_without_affinity_batches_are_as_before(max_tokens: int) -> None:
    plain: MicroBatcher[str] = MicroBatcher(max_size=4, max_delay_s=0.0, max_tokens=max_tokens, clock=lambda: 0.0)
    for i, cost in enumerate([300, 100, 310, 105, 290, 120, 305]):
        plain.add("g", f"i{i}", cost=cost, arrived_at=float(i))
    assert plain.take() == (["i0", "i1", "i2", "i3"] if not max_tokens else ["i0", "i2", "i4", "i6"])


def test_padding_aware_affinity_keeps_the_oldest_and_the_budget() -> None:
    # img0 is cheap, img1 dear: the oldest (img0-q0) goes, and the budget still caps the batch.
    batcher: MicroBatcher[str] = MicroBatcher(max_size=4, max_delay_s=0.0, max_tokens=2000, clock=lambda: 100.0)
    _interleaved(batcher, images=2, questions=3, cost={"img0": 300, "img1": 900})
    first = batcher.take()
    assert first == ["img0-q0", "img0-q1", "img0-q2"]  # img1's prompts would pad past the budget
    assert batcher.take() == ["img1-q0", "img1-q1"]  # 2 x 902 fits 2000; a third would not
    assert batcher.take() == ["img1-q2"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(50, 400)), min_size=1, max_size=24), st.integers(1, 6),
       st.sampled_from([0, 800, 2000]))
def test_affinity_never_drops_or_starves_an_item(items: list[tuple[int, int]], size: int, budget: int) -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_size=size, max_delay_s=0.0, max_tokens=budget, clock=lambda: 100.0)
    for n, (image, cost) in enumerate(items):
        batcher.add("g", n, cost=cost, arrived_at=float(n), affinity=image)
    seen: list[int] = []
    while len(batcher):
        remaining = sorted(set(range(len(items))) - set(seen))
        batch = batcher.take()
        assert remaining[0] in batch  # the oldest waiting item is always in the batch
        assert len(batch) <= size
        if budget and len(batch) > 1:
            assert len(batch) * max(items[n][1] for n in batch) <= budget
        seen.extend(batch)
    assert sorted(seen) == list(range(len(items)))
