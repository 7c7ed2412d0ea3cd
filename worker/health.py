"""Is this worker making progress? What ``GET /healthz`` on ``VQA_METRICS_PORT`` answers.

A live HTTP thread proves nothing, so the check looks at the parts that do the work:

* the consumer loop went round recently (it wakes at least every 0.2 s; a Redis call may block
  it for up to its 30 s socket timeout);
* the model and writer threads are alive (if one died, its jobs would wait for the visibility
  timeout);
* no generate call has run longer than the visibility timeout (a hung GPU: by then its jobs are
  redelivered to other workers, and a restart is the cure).

Redis being away is reported but is not a failure: restarting the worker would not bring it back.

``GET /readyz`` is the readiness check: 200 only once the model is loaded and a warm-up batch
ran through it (:class:`Readiness`), and while the liveness check above passes. While the
worker is still loading or warming up, ``/healthz`` answers 200 with the phase (it is alive;
a load that hangs is caught by a startup probe on ``/readyz``, see deploy/k8s/); once it is
stopping, ``/readyz`` answers 503 again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

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


Phase = Literal["loading", "warming", "ready", "stopping"]


class Readiness:
    """Where the worker is in its life: loading -> warming -> ready -> stopping; set by worker/main.py, read by the endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase: Phase = "loading"
        self._since = time.monotonic()
        self._facts: dict[str, Any] = {}
        self._progress: Callable[[], Progress] | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    def advance(self, phase: Phase, **facts: Any) -> None:
        """Enter ``phase``; ``facts`` (e.g. load time) are kept and shown in every report from now on."""
        with self._lock:
            self._phase, self._since = phase, time.monotonic()
            self._facts.update(facts)

    def watch(self, progress: Callable[[], Progress]) -> None:
        """The consumer's progress snapshot, judged by :func:`check` once the worker serves."""
        self._progress = progress

    def _snapshot(self) -> tuple[Phase, dict[str, Any]]:
        with self._lock:
            return self._phase, {"phase": self._phase, "phase_s": round(time.monotonic() - self._since, 3), **self._facts}

    def liveness(self, *, visibility_timeout: float) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: starting or stopping is alive; serving is judged by :func:`check`."""
        phase, facts = self._snapshot()
        if phase != "ready" or self._progress is None:
            return True, {"status": "ok", "problems": [], **facts}
        healthy, report = check(self._progress(), visibility_timeout=visibility_timeout)
        return healthy, {**report, **facts}

    def readiness(self, *, visibility_timeout: float) -> tuple[bool, dict[str, Any]]:
        """``/readyz``: the model is loaded, the warm-up batch ran, and the liveness check passes."""
        phase, facts = self._snapshot()
        if phase != "ready":
            return False, {"status": "not ready", "problems": [f"worker is {phase}"], **facts}
        healthy, report = self.liveness(visibility_timeout=visibility_timeout)
        return healthy, {**report, "status": "ready" if healthy else "not ready"}
