"""Is this worker making progress? What ``GET /healthz`` on ``VQA_METRICS_PORT`` answers.

A live HTTP thread proves nothing, so the check looks at the parts that do the work:

* the consumer loop went round recently (it wakes at least every 0.2 s; a Redis call may block
  it for up to its 30 s socket timeout);
* the model and writer threads are alive (if one died, its jobs would wait for the visibility
  timeout);
* no generate call has run longer than the visibility timeout (a hung GPU: by then its jobs are
  redelivered to other workers, and a restart is the cure).

Redis being away is reported but is not a failure: restarting the worker would not bring it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

LOOP_STALE_S = 60.0


@dataclass(frozen=True)
class Progress:
    """A snapshot of the consumer's moving parts (``BatchingConsumer.progress``)."""

    loop_age_s: float | None  # since the consumer loop last went round; None before it started
    model_thread_alive: bool
    writer_thread_alive: bool
    broker_reachable: bool
    generate_running_s: float | None  # the generate call in progress, if any
    jobs_held: int


def check(progress: Progress, *, visibility_timeout: float) -> tuple[bool, dict[str, Any]]:
    """(healthy, a JSON-able report naming every problem)."""
    problems = []
    if progress.loop_age_s is None:
        problems.append("consumer loop not started")
    elif progress.loop_age_s > LOOP_STALE_S:
        problems.append(f"consumer loop stalled for {progress.loop_age_s:.0f} s")
    if not progress.model_thread_alive:
        problems.append("model thread is not running")
    if not progress.writer_thread_alive:
        problems.append("writer thread is not running")
    running = progress.generate_running_s
    if running is not None and running > visibility_timeout:
        problems.append(f"a generate call has run {running:.0f} s, past the visibility timeout ({visibility_timeout:.0f} s)")
    report = {"status": "ok" if not problems else "unhealthy", "problems": problems, **asdict(progress)}
    return not problems, report
