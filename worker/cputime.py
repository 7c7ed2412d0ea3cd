"""CPU seconds the worker spends in the model, in decoding images and in preprocessing them, as running totals.

Each stage is timed with ``time.thread_time()`` on the thread that runs it: the model thread
around the engine's batched call, the fetch pool around decoding and preprocessing. What the
process spends besides these three is the queue's own cost (Redis, S3, messages, records,
logging), which ``python -m bench`` reports per job as "pipeline CPU".

A thread's clock counts that thread only. With torch's intra-op threads at 1
(``OMP_NUM_THREADS=1``) every kernel runs on the thread that called it, so the three totals are
all of the model's and preprocessing's CPU; with more, the helper threads' share is missing
from them (and so lands in the remainder). The serving process reads them at scrape time as
``vqa_{model,decode,preprocess}_cpu_seconds_total`` (worker/metrics.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

Stage = Literal["model", "decode", "preprocess"]
STAGES: tuple[Stage, ...] = ("model", "decode", "preprocess")


class CpuAccount:
    """Running CPU totals per stage, added to from any thread."""

    def __init__(self, *, clock: Callable[[], float] = time.thread_time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seconds: dict[Stage, float] = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def measure(self, stage: Stage) -> Iterator[None]:
        """Add the calling thread's CPU time inside the block to ``stage`` (also when the block raises)."""
        start = self._clock()
        try:
            yield
        finally:
            spent = self._clock() - start
            with self._lock:
                self._seconds[stage] += spent

    def add(self, stage: Stage, seconds: float) -> None:
        """Add CPU seconds spent elsewhere (a preprocessing process's, worker/preprocess_pool.py) to ``stage``."""
        with self._lock:
            self._seconds[stage] += seconds

    def seconds(self) -> dict[Stage, float]:
        """The totals so far, per stage."""
        with self._lock:
            return dict(self._seconds)
