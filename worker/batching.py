"""Micro-batching: group ready jobs by generation settings; flush when full or when the oldest has waited long enough.

Padding-aware mode (``max_tokens > 0``): every item carries a *cost*, its prompt length in
tokens once the image is preprocessed (LLaVA-NeXT spends a different number of image tokens
on each image shape). A batch is padded to its longest prompt, so it costs
``len(batch) * max(cost)`` tokens of compute. The batcher then picks, around the oldest item
of a due group, the run of items closest to it in cost that fills a batch with the least
padding and stays within ``max_tokens`` padded tokens. The oldest item is always in the batch,
so no item waits behind a stream of better-fitting ones.

Affinity (``add(..., affinity=image_key)``): items about one image are worth putting together
(worker/prefix.py prefills the image once for all of them). A batch starts from the oldest
item's image, then takes every other image's items together, in the order of their oldest
item, so that interleaved arrivals (img1-q1, img2-q1, img1-q2, img2-q2) still share. With
padding-aware batching one image's items sit next to each other in the cost order, and a batch
that splits an image's items pays, in the score, one more prefill of that image. Items without
an affinity are alone in their own group: with none set, batches are exactly as without.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    item: T
    cost: int
    arrived_at: float
    seq: int
    affinity: Hashable | None = None


@dataclass
class _Group(Generic[T]):
    entries: list[_Entry[T]] = field(default_factory=list)

    @property
    def first_at(self) -> float:
        return min(entry.arrived_at for entry in self.entries)


@dataclass(frozen=True)
class Selection:
    """What :meth:`MicroBatcher.take` would return from one group, and whether that batch is complete."""

    indices: tuple[int, ...]
    complete: bool  # limited by max_size or the token budget, not by a lack of items
    real_tokens: int
    padded_tokens: int


class MicroBatcher(Generic[T]):
    """Holds items in groups keyed by what must not be mixed in one ``generate`` call.

    A group is *due* once it can fill a complete batch (``max_size`` items, or as many as the
    token budget allows) or its oldest item has waited ``max_delay_s``. :meth:`take` returns
    the most urgent due batch: complete ones first, then the oldest. The caller decides when
    to take (the worker takes only when the model is free, or has a complete batch to queue
    behind the running one, so a busy model lets batches fill up instead of flushing many
    small ones).
    """

    def __init__(
        self,
        *,
        max_size: int,
        max_delay_s: float,
        max_tokens: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if max_tokens < 0:
            raise ValueError("max_tokens must be 0 (off) or positive")
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.max_tokens = max_tokens
        self._clock = clock
        self._groups: dict[Hashable, _Group[T]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(len(group.entries) for group in self._groups.values())

    def add(self, key: Hashable, item: T, *, cost: int = 0, arrived_at: float | None = None, affinity: Hashable | None = None) -> None:
        """Add a ready item. ``arrived_at`` (clock time) backdates it, e.g. to when its message arrived.

        Items with one ``affinity`` (e.g. an image's content hash) are preferred in one batch.
        """
        group = self._groups.setdefault(key, _Group())
        when = self._clock() if arrived_at is None else arrived_at
        group.entries.append(_Entry(item=item, cost=max(0, int(cost)), arrived_at=when, seq=next(self._seq), affinity=affinity))

    def next_due_in(self) -> float | None:
        """Seconds until some group becomes due (0 if one is due now); None when empty."""
        if not self._groups:
            return None
        now = self._clock()
        waits = []
        for group in self._groups.values():
            if self.select(group.entries).complete:
                return 0.0
            waits.append(max(0.0, group.first_at + self.max_delay_s - now))
        return min(waits)

    def has_complete(self) -> bool:
        """Whether some group can fill a complete batch now (worth queueing behind a running one)."""
        return any(self.select(group.entries).complete for group in self._groups.values())

    def take(self, *, complete_only: bool = False) -> list[T]:
        """Remove and return the most urgent due batch; [] if none is due.

        With ``complete_only`` only a complete batch is returned, never one flushed by age.
        """
        now = self._clock()
        best: tuple[tuple[bool, float], Hashable, Selection] | None = None
        for key, group in self._groups.items():
            selection = self.select(group.entries)
            first_at = group.first_at
            aged = now - first_at >= self.max_delay_s
            if not (selection.complete or (aged and not complete_only)):
                continue
            rank = (not selection.complete, first_at)
            if best is None or rank < best[0]:
                best = (rank, key, selection)
        if best is None:
            return []
        _, key, selection = best
        group = self._groups[key]
        chosen = set(selection.indices)
        batch = [group.entries[i].item for i in selection.indices]
        # The rest keep their arrival times: they have waited as long as the batch did.
        group.entries = [entry for i, entry in enumerate(group.entries) if i not in chosen]
        if not group.entries:
            del self._groups[key]
        return batch

    def drain(self) -> list[T]:
        """Remove and return everything (used on shutdown to hand jobs back)."""
        items = [entry.item for group in self._groups.values() for entry in group.entries]
        self._groups.clear()
        return items

    # -- choosing a batch within one group -------------------------------------------------

    def select(self, entries: list[_Entry[T]]) -> Selection:
        """The batch to take from ``entries`` (in arrival order)."""
        if not entries:
            return Selection((), False, 0, 0)
        if not self.max_tokens:
            # Padding-blind: first come, first served, an image's items together.
            order = [i for members in _affinity_groups(entries, range(len(entries))) for i in members]
            indices = tuple(sorted(order[: self.max_size]))
            return _selection(entries, indices, complete=len(entries) >= self.max_size)
        return self._select_by_cost(entries)

    def _select_by_cost(self, entries: list[_Entry[T]]) -> Selection:
        by_cost = sorted(range(len(entries)), key=lambda i: (entries[i].cost, entries[i].seq))
        # Cost order, one image's items next to each other (each group at its dearest item's cost).
        groups = sorted(_affinity_groups(entries, by_cost), key=lambda g: (max(entries[i].cost for i in g), min(entries[i].seq for i in g)))
        order = [i for members in groups for i in members]
        group_of = {i: n for n, members in enumerate(groups) for i in members}
        oldest = min(range(len(entries)), key=lambda i: (entries[i].arrived_at, entries[i].seq))
        anchor = order.index(oldest)
        costs = [entries[i].cost for i in order]
        n_items = len(order)
        for size in range(min(self.max_size, n_items), 0, -1):
            # Windows of `size` neighbours in that order that hold the oldest item and fit the
            # budget. Score: this batch's padding plus what the rest would pad in batches of
            # max_size, so the choice does not strand awkward leftovers, plus one prefill of
            # each image whose items the window splits.
            best: tuple[int, int] | None = None  # (waste, start)
            for start in range(max(0, anchor - size + 1), min(anchor, n_items - size) + 1):
                window = costs[start : start + size]
                padded = size * max(window)
                if size > 1 and padded > self.max_tokens:
                    continue
                waste = padded - sum(window)
                waste += _chunked_waste(sorted(costs[:start] + costs[start + size :]), self.max_size)
                waste += _split_cost(entries, groups, {group_of[i] for i in order[start : start + size]}, order[start : start + size])
                if best is None or waste < best[0]:
                    best = (waste, start)
            if best is None:
                continue
            start = best[1]
            indices = tuple(sorted(order[start : start + size]))
            # Complete when it is as big as allowed: max_size reached, or one more item
            # (the next cheapest or dearest neighbour) would break the token budget.
            complete = size == self.max_size or size < n_items
            return _selection(entries, indices, complete=complete)
        raise AssertionError("a single item always fits")  # pragma: no cover - size 1 never fails


def _affinity_groups(entries: list[_Entry[T]], order: Iterable[int]) -> list[list[int]]:
    """Indices grouped by affinity, groups in the order of their first index in ``order``; no affinity: a group of one."""
    groups: dict[Hashable, list[int]] = {}
    for i in order:
        affinity = entries[i].affinity
        groups.setdefault(("seq", entries[i].seq) if affinity is None else ("affinity", affinity), []).append(i)
    return list(groups.values())


def _split_cost(entries: list[_Entry[T]], groups: list[list[int]], touched: set[int], window: list[int]) -> int:
    """Tokens of one more prefill (the cheapest item's prompt) for each image group the window cuts."""
    inside = set(window)
    cost = 0
    for n in touched:
        members = groups[n]
        if len(members) > 1 and not inside.issuperset(members):
            cost += min(entries[i].cost for i in members)
    return cost


def _chunked_waste(sorted_costs: list[int], size: int) -> int:
    """Padding of ascending costs cut into consecutive batches of ``size`` (the short one first or last, whichever pads less)."""

    def waste(first: int) -> int:
        bounds = [0, *range(first, len(sorted_costs), size), len(sorted_costs)]
        return sum((b - a) * sorted_costs[b - 1] - sum(sorted_costs[a:b]) for a, b in zip(bounds, bounds[1:], strict=False) if b > a)

    if not sorted_costs:
        return 0
    return min(waste(size), waste(len(sorted_costs) % size or size))


def _selection(entries: list[_Entry[T]], indices: tuple[int, ...], *, complete: bool) -> Selection:
    costs = [entries[i].cost for i in indices]
    return Selection(indices, complete, sum(costs), len(costs) * max(costs, default=0))


def padding_efficiency(batches: list[list[int]]) -> float:
    """Real tokens / padded tokens over batches of prompt lengths (1.0 = no padding at all)."""
    real = sum(sum(batch) for batch in batches)
    padded = sum(len(batch) * max(batch) for batch in batches if batch)
    return real / padded if padded else 1.0


# Batches a worker hands to its model thread at once: one running and one queued behind it.
RUNNING_AND_QUEUED = 2


def prefetch_batches(max_tokens: int) -> int:
    """How many batches' worth of messages a worker holds: one running and one queued behind it.

    Padding-aware batching takes one more, so that while a batch runs the batcher has two
    batches' worth of ready jobs to pick the best-fitting next batch from.
    """
    return RUNNING_AND_QUEUED + (1 if max_tokens else 0)
