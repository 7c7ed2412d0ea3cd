"""One fetch, one decode, one image preprocessing for the jobs in a worker that ask about one image.

Jobs about the same URL that are in the worker at the same time (a bulk line's ``questions``,
or independent submissions that overlap) get one :class:`SharedImage`: the first job's fetch
thread loads it (fetch under the SSRF guard and caps, decode, the engine's image part), the
others wait for that load instead of starting their own.

Memory: the cache holds its entries *weakly*. Each job that used an image holds the entry on its
``Prepared`` (worker/jobs.py), so an entry lives exactly as long as some job in the worker still
needs it, and goes when the last one is done (acked, handed back, or re-fetched for a retry):
the cache never holds an image no job holds, however long the worker runs. It also stops serving
an entry ``max_age_s`` after it was loaded (a URL's content may change), and holds at most
``max_entries`` keys (beyond that a job loads its image alone, as without the cache).

Failures are not cached: every job waiting on a load that failed gets its own copy of the error
(its own retry or failed record), and the next job for that URL loads it again.
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any


class SharedImage:
    """One image's load, shared by the jobs that wait for it and held by every job that used it."""

    __slots__ = ("_done", "value", "error", "loaded_at", "__weakref__")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.loaded_at = float("inf")

    def _wait(self) -> Any:
        self._done.wait()
        if self.error is not None:
            raise _own_copy(self.error)
        return self.value


class SharedImages:
    """Single-flight, weakly held image cache keyed by image URL; thread-safe (called from the fetch pool)."""

    def __init__(self, *, max_entries: int, max_age_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: weakref.WeakValueDictionary[Hashable, SharedImage] = weakref.WeakValueDictionary()
        self.loads = 0  # loader calls (image fetches)
        self.shared = 0  # gets answered by another job's load

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, load: Callable[[], Any]) -> tuple[SharedImage, bool]:
        """The image for ``key``, and whether this call loaded it; raises what the load raised (a copy when shared).

        Keep the returned :class:`SharedImage` for as long as the job needs the image: that
        reference is what keeps the entry for jobs arriving meanwhile.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry._done.is_set() and self._clock() - entry.loaded_at > self.max_age_s:
                del self._entries[key]  # too old to serve; the jobs holding it keep it meanwhile
                entry = None
            if entry is not None:
                self.shared += 1
                owner = False
            else:
                entry, owner = SharedImage(), True
                if len(self._entries) < self.max_entries:
                    self._entries[key] = entry
                self.loads += 1
        if not owner:
            entry._wait()
            return entry, False
        try:
            entry.value = load()
        except BaseException as exc:
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]  # not cached: the next job tries again
            entry.error = exc
            entry._done.set()
            raise
        entry.loaded_at = self._clock()
        entry._done.set()
        return entry, True


def _own_copy(error: BaseException) -> BaseException:
    """A fresh exception per waiting job: jobs never share (and mutate) one exception's traceback."""
    try:
        return copy.copy(error)
    except Exception:  # noqa: BLE001 - an exception type that cannot be copied is raised as it is
        return error
