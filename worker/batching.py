"""Micro-batching: group waiting jobs by generation settings; flush when full or when the oldest has waited long enough."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Group(Generic[T]):
    items: list[T] = field(default_factory=list)
    first_at: float = 0.0


class MicroBatcher(Generic[T]):
    """Holds items in groups keyed by what must not be mixed in one ``generate`` call.

    A group is *due* once it holds ``max_size`` items or its oldest item has waited
    ``max_delay_s``. :meth:`take` returns the most urgent due group, at most ``max_size`` items.
    The caller decides when to take (the worker takes only when the model is free, so a busy
    model lets batches fill up instead of flushing many small ones).
    """

    def __init__(self, *, max_size: int, max_delay_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._clock = clock
        self._groups: dict[Hashable, _Group[T]] = {}

    def __len__(self) -> int:
        return sum(len(group.items) for group in self._groups.values())

    def add(self, key: Hashable, item: T) -> None:
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(first_at=self._clock())
        group.items.append(item)

    def next_due_in(self) -> float | None:
        """Seconds until some group becomes due (0 if one is due now); None when empty."""
        if not self._groups:
            return None
        now = self._clock()
        waits = []
        for group in self._groups.values():
            if len(group.items) >= self.max_size:
                return 0.0
            waits.append(max(0.0, group.first_at + self.max_delay_s - now))
        return min(waits)

    def take(self) -> list[T]:
        """Remove and return the most urgent due group (full groups first, then the oldest); [] if none is due."""
        now = self._clock()
        due = [
            (len(group.items) < self.max_size, group.first_at, key)
            for key, group in self._groups.items()
            if len(group.items) >= self.max_size or now - group.first_at >= self.max_delay_s
        ]
        if not due:
            return []
        _, _, key = min(due, key=lambda entry: (entry[0], entry[1]))
        group = self._groups[key]
        batch, rest = group.items[: self.max_size], group.items[self.max_size :]
        if rest:
            # The remainder keeps its age: those items have waited as long as the batch did.
            group.items = rest
        else:
            del self._groups[key]
        return batch

    def drain(self) -> list[T]:
        """Remove and return everything (used on shutdown to hand jobs back)."""
        items = [item for group in self._groups.values() for item in group.items]
        self._groups.clear()
        return items
