"""A bulk run's status: what ``vqa bulk status`` prints and ``{prefix}bulk/{bulk_id}/status.json`` holds.

The counts come from one atomic read of the run's Redis keys (producer/bulk/state.py), so they
add up at every poll::

    total = queued + running + succeeded + failed + cancelled + expired

``total``      jobs published so far (a manifest line gives one job per question). While the
               manifest is still being read (``manifest_complete`` false) it grows; a line read
               but not yet published (waiting for the window) is not in it. Final once
               ``manifest_complete`` is true: after the last line, or at a cancel, which closes
               the run at what was published.
``queued``     published, no outcome, not started by a worker
``running``    started in a model at least once (a redelivery after a crash stays here), no outcome
``succeeded``, ``failed``, ``cancelled``, ``expired``
               stored records, each job counted once, by the worker that stored it
``invalid``    manifest lines skipped (reported in invalid.jsonl); lines, not jobs, so not in ``total``
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

State = Literal["in_progress", "cancelling", "completed", "cancelled"]
ENDED: frozenset[str] = frozenset({"completed", "cancelled"})
OUTCOMES = ("succeeded", "failed", "cancelled", "expired")


class BulkCounts(BaseModel):
    """Jobs of the run by where they are (see the module docstring); ``invalid`` counts manifest lines."""

    model_config = ConfigDict(frozen=True)

    total: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    invalid: int = 0

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.cancelled + self.expired

    def adds_up(self) -> bool:
        return self.total == self.queued + self.running + self.finished


class BulkUsage(BaseModel):
    """What the run's finished jobs cost the model, summed from their records."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0  # image tokens included
    image_tokens: int = 0
    generated_tokens: int = 0
    model_ms: float = 0.0  # the jobs' shares of their batches' generate time


class BulkStatus(BaseModel):
    """One snapshot of a run."""

    model_config = ConfigDict(frozen=True)

    bulk_id: str
    state: State
    source: str
    created_at: datetime
    expires_at: datetime | None = None
    ended_at: datetime | None = None
    updated_at: datetime
    manifest_complete: bool = False
    lines_done: int = 0  # manifest lines behind the cursor: published or reported invalid
    manifest_lines: int | None = None  # lines in the manifest (known for files; exact once complete)
    window: int = 0
    counts: BulkCounts = BulkCounts()
    usage: BulkUsage = BulkUsage()

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def estimated_total(self) -> int | None:
        """The total to expect when the manifest is read: exact once it is, else extrapolated from the lines so far."""
        counts = self.counts
        if self.manifest_complete:
            return counts.total
        if not self.manifest_lines or not self.lines_done:
            return None
        jobs_per_line = counts.total / max(self.lines_done - counts.invalid, 1)
        remaining = max(self.manifest_lines - self.lines_done, 0)
        return counts.total + round(remaining * jobs_per_line)


def from_meta(bulk_id: str, meta: dict[str, str], *, in_flight: int, running: int) -> BulkStatus:
    """Build the status from the meta hash and the two set sizes read with it."""
    outcomes = {name: _int(meta.get(name)) for name in OUTCOMES}
    running = min(running, in_flight)  # running is a subset of in flight; never show more
    counts = BulkCounts(
        total=_int(meta.get("total")),
        queued=in_flight - running,
        running=running,
        invalid=_int(meta.get("invalid")),
        **outcomes,
    )
    manifest_lines = meta.get("manifest_lines") or ""
    return BulkStatus(
        bulk_id=bulk_id,
        state=meta.get("state", "in_progress"),  # type: ignore[arg-type]
        source=meta.get("source", ""),
        created_at=_time(meta.get("created_at")) or datetime.now(UTC),
        expires_at=_time(meta.get("expires_at")),
        ended_at=_time(meta.get("ended_at")),
        updated_at=datetime.now(UTC),
        manifest_complete=meta.get("manifest_complete") == "1",
        lines_done=_int(meta.get("lines_done")),
        manifest_lines=int(manifest_lines) if manifest_lines else None,
        window=_int(meta.get("window")),
        counts=counts,
        usage=BulkUsage(
            prompt_tokens=_int(meta.get("prompt_tokens")),
            image_tokens=_int(meta.get("image_tokens")),
            generated_tokens=_int(meta.get("generated_tokens")),
            model_ms=round(float(meta.get("model_ms") or 0.0), 3),
        ),
    )


def _int(value: str | None) -> int:
    return int(value) if value else 0


def _time(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value else None
