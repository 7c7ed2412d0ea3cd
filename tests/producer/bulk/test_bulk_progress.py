"""What `vqa bulk submit` shows: the summary line, the rate and ETA, the total expected while the manifest streams."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from rich.console import Console

from producer.bulk.progress import ProgressDisplay, Rate, duration, eta_s, summary
from producer.bulk.status import BulkCounts, BulkStatus


def status(*, total: int, succeeded: int, lines_done: int, manifest_lines: int | None, complete: bool = False, invalid: int = 0) -> BulkStatus:
    now = datetime.now(UTC)
    return BulkStatus(
        bulk_id="run-1", state="in_progress", source="m.jsonl", created_at=now, updated_at=now, manifest_complete=complete,
        lines_done=lines_done, manifest_lines=manifest_lines,
        counts=BulkCounts(total=total, queued=total - succeeded, succeeded=succeeded, invalid=invalid),
    )


def test_the_total_is_extrapolated_until_the_manifest_is_read() -> None:
    # 100 lines read, 10 of them invalid, 180 jobs: two questions per valid line.
    streaming = status(total=180, succeeded=50, lines_done=100, manifest_lines=1000, invalid=10)
    assert streaming.estimated_total() == 180 + 900 * 2
    assert status(total=180, succeeded=50, lines_done=100, manifest_lines=None).estimated_total() is None
    assert status(total=180, succeeded=50, lines_done=100, manifest_lines=1000, complete=True).estimated_total() == 180


def test_rate_eta_and_the_summary_line() -> None:
    rate = Rate()
    assert rate.add(0, now=0.0) is None
    assert rate.add(100, now=10.0) == 10.0
    current = status(total=400, succeeded=100, lines_done=400, manifest_lines=1000)
    assert eta_s(current, 10.0) == (1000 - 100) / 10.0
    assert duration(3725) == "1h02m" and duration(95) == "1m35s" and duration(7) == "7s" and duration(None) == "?"
    line = summary(current, 10.0)
    assert line.startswith("run-1 in_progress: 400/~1,000 published, 300 queued, 0 running, 100 succeeded")
    assert line.endswith("0 invalid lines; 10.0 jobs/s, ETA 1m30s")


def test_lines_off_a_terminal_and_a_bar_on_one() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, live=False, interval_s=3600)
    display.update(status(total=10, succeeded=1, lines_done=10, manifest_lines=10))
    display.update(status(total=10, succeeded=2, lines_done=10, manifest_lines=10))  # within the interval: no line
    display.close()  # the last status, always
    assert stream.getvalue().count("\n") == 2 and "2 succeeded" in stream.getvalue().splitlines()[-1]

    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    bar = ProgressDisplay(io.StringIO(), live=True, console=console)
    bar.update(status(total=10, succeeded=4, lines_done=10, manifest_lines=10, complete=True))
    snapshot = Console(file=io.StringIO(), width=120, color_system=None, record=True)
    assert bar._bar is not None
    snapshot.print(bar._bar.get_renderable())
    assert "4/10 · published 10 · ok 4 · failed 0 · invalid 0" in snapshot.export_text()
    bar.close()
