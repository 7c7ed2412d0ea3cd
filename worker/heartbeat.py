"""A worker's heartbeat in Redis, from a thread of its own: what keeps its messages its own (worker/broker.py).

Its own thread, because the consumer loop can be busy (a slow Redis call, a batch to hand out)
and the model thread can be inside a long batch: neither may make the worker look dead. The
thread holds its own Redis connection and beats every ``interval_s``; the other workers restore
this one's messages once its last beat is older than the heartbeat timeout. A beat that finds
the heartbeat missing after the first means this worker was presumed dead (paused, or cut off
from Redis) and its messages went to others: it says so, and the acks it sends for them are
refused (worker/ledger.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Beats(Protocol):
    """What the thread beats on: worker.broker.RedisQueue."""

    consumer_id: str

    def heartbeat(self) -> bool: ...


class Heartbeat:
    """Beats every ``interval_s`` until :meth:`stop`; the first beat happens in :meth:`start`, before any message is taken."""

    def __init__(self, queue: Beats, *, interval_s: float) -> None:
        self.queue = queue
        self.interval_s = interval_s
        self.presumed_dead = 0  # times a beat found this worker had been given up on
        self.failures = 0  # beats that could not reach Redis
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vqa-heartbeat", daemon=True)

    def start(self) -> None:
        try:
            self.queue.heartbeat()
        except Exception as exc:  # noqa: BLE001 - Redis away at start: the thread keeps trying
            self.failures += 1
            log.warning("first heartbeat failed (%s); retrying every %.1f s", type(exc).__name__, self.interval_s)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                missing = self.queue.heartbeat()
            except Exception as exc:  # noqa: BLE001 - any error: beat again next time; never end the thread
                self.failures += 1
                log.warning("heartbeat failed (%s: %s)", type(exc).__name__, exc)
                continue
            if missing:
                self.presumed_dead += 1
                log.warning(
                    "worker %s was presumed dead (no heartbeat for the heartbeat timeout): the messages it held were "
                    "restored to other workers, and its acks for them will be refused",
                    self.queue.consumer_id,
                )
