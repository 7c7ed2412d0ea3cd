"""Progress of a bulk run on the terminal: a live bar (rich) on a terminal, one-line summaries elsewhere.

Every figure comes from the run's status (what workers stored), polled, never from guesses;
the rate is of finished jobs over the last polls, and the ETA divides what is left by it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from producer.bulk.status import BulkStatus

_RATE_WINDOW_S = 30.0


class Rate:
    """Finished jobs per second over the last ``_RATE_WINDOW_S`` of polls."""

    def __init__(self) -> None:
        self._points: deque[tuple[float, int]] = deque()

    def add(self, finished: int, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        self._points.append((now, finished))
        while len(self._points) > 2 and now - self._points[0][0] > _RATE_WINDOW_S:
            self._points.popleft()
        (start, first), (end, last) = self._points[0], self._points[-1]
        return (last - first) / (end - start) if end - start >= 1.0 else None


def eta_s(status: BulkStatus, rate: float | None) -> float | None:
    total = status.estimated_total()
    if total is None or not rate:
        return None
    return max(total - status.counts.finished, 0) / rate


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def summary(status: BulkStatus, rate: float | None) -> str:
    """One line: everything ``vqa bulk status`` counts, the rate and the ETA."""
    counts = status.counts
    total = status.estimated_total()
    of = f"{counts.total:,}" if status.manifest_complete else f"{counts.total:,}/~{total:,}" if total else f"{counts.total:,}+"
    rate_text = "?" if rate is None else f"{rate:,.1f}"
    return (
        f"{status.bulk_id} {status.state}: {of} published, {counts.queued:,} queued, {counts.running:,} running, "
        f"{counts.succeeded:,} succeeded, {counts.failed:,} failed, {counts.cancelled:,} cancelled, {counts.expired:,} expired, "
        f"{counts.invalid:,} invalid lines; {rate_text} jobs/s, ETA {duration(eta_s(status, rate))}"
    )


class ProgressDisplay:
    """Shows a run's status as it moves. ``update(status)`` at each poll, ``close()`` at the end (prints the last line)."""

    def __init__(self, stream: IO[str], *, live: bool | None = None, interval_s: float = 10.0, console: Console | None = None) -> None:
        self.console = console or Console(file=stream, stderr=False)
        self.live = self.console.is_terminal if live is None else live
        self.interval_s = interval_s
        self.stream = stream
        self.rate = Rate()
        # None until the first line: monotonic() counts from boot, so a number here would hide it on a fresh machine.
        self._printed: float | None = None
        self._last: BulkStatus | None = None
        self._last_rate: float | None = None
        self._bar: Progress | None = None
        self._task: Any = None

    def update(self, status: BulkStatus) -> float | None:
        """Show the status; return the rate of finished jobs per second (None until it is known)."""
        rate = self.rate.add(status.counts.finished)
        self._last, self._last_rate = status, rate
        if self.live:
            self._draw(status, rate)
        elif self._printed is None or time.monotonic() - self._printed >= self.interval_s:
            self._printed = time.monotonic()
            print(summary(status, rate), file=self.stream, flush=True)
        return rate

    def _draw(self, status: BulkStatus, rate: float | None) -> None:
        counts = status.counts
        if self._bar is None:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"),
                console=self.console,
                refresh_per_second=4,
            )
            self._bar.start()
            self._task = self._bar.add_task(status.bulk_id, total=None, counts="", eta="")
        total = status.estimated_total()
        failed = counts.failed + counts.cancelled + counts.expired
        text = (
            f"{counts.finished:,}/{total:,}" if total else f"{counts.finished:,}/?"
        ) + f" · published {counts.total:,} · ok {counts.succeeded:,} · failed {failed:,} · invalid {counts.invalid:,}"
        rate_text = "" if rate is None else f"{rate:,.1f} jobs/s"
        eta = eta_s(status, rate)
        self._bar.update(
            self._task, completed=counts.finished, total=total or None, counts=text,
            eta=f"{rate_text} ETA {duration(eta)}" if eta is not None else rate_text,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._last is not None:
            print(summary(self._last, self._last_rate), file=self.stream, flush=True)
